"""Embedding map of one level (paper Fig. S2): the learned level embeddings next to the frozen text
encoder's, coloured by a higher rank, with a separation score for each.

Vectors. Every taxon at `level` has one prompt "<rank>: <name>" (Taxonomy.prompt). It goes through
the frozen text encoder (raw: 77 x D) and through that level's encoder
(TaxonomyConditioner.encode_level: what the UNet receives from this level). Each 77 x D sequence is
pooled to one vector, the same way for both: the mean over the prompt's own tokens after BOS,
through EOS (the tokenizer's attention mask without position 0). Padding is left out because it
repeats the end token and would dilute short and long prompts differently; BOS is left out because
its raw CLIP state is the same for every prompt (causal attention: it sees only itself) and, in
CLIP-L, of very large norm, so it would swamp the cosine distances of the raw embeddings.

Score. sklearn's silhouette_score of the pooled vectors (full dimension, cosine distance), labels =
each taxon's ancestor at the `color_by` rank (its lineage path, so a reused name is two groups). In
[-1, 1]: higher means taxa of one group are nearer each other than taxa of other groups.

Picture. sklearn TSNE to 2-D (cosine metric, PCA init, fixed random_state). Perplexity defaults to
(n - 1) / 3 clipped to [1, 30] (`perplexity_for`): sklearn requires perplexity < n, and it uses
3 * perplexity + 1 neighbours, which should fit in the n - 1 other points.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..sampling import load_for_sampling, slug
from . import output_folder, publish

REPORT_ORDER = 70
MAX_LEGEND = 20  # groups named in the legend; beyond that colours repeat and names would not fit


def perplexity_for(n: int, requested: float | None = None) -> float:
    """The t-SNE perplexity for n points (see the module docstring); a requested one is checked."""
    if n < 2:
        raise ValueError(f"an embedding map needs at least 2 taxa, got {n}")
    if requested is not None:
        if not 0 < requested < n:
            raise ValueError(f"perplexity must be in (0, {n}) for {n} taxa, got {requested}")
        return float(requested)
    return float(min(30.0, max(1.0, (n - 1) / 3)))


def pool_tokens(seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, 77, D), (N, 77) attention mask -> (N, D): mean over the masked tokens after BOS."""
    m = mask.clone().to(seq.dtype)
    m[:, 0] = 0
    return (seq * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)


@torch.no_grad()
def level_vectors(pipe, level: int, prompts: list[str],
                  batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(learned (N, D), raw (N, D)): pooled level-`level` encoder outputs and raw text embeddings."""
    if pipe.conditioner is None:
        raise ValueError("an embedding map needs a TaxonomyConditioner; this pipeline is a flat "
                         "text baseline (it has no level encoders)")
    tok = pipe.tokenizer
    learned, raw = [], []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        mask = tok(chunk, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").attention_mask
        emb = pipe.text_cache.encode(chunk)
        enc = pipe.conditioner.encode_level(level, emb.to(pipe.device, pipe.conditioner.dtype))
        raw.append(pool_tokens(emb.float(), mask))
        learned.append(pool_tokens(enc.float().cpu(), mask))
    return torch.cat(learned).numpy().astype(np.float64), torch.cat(raw).numpy().astype(np.float64)


@dataclass
class EmbeddingMap:
    level: int
    color_by: int
    rank: str
    color_rank: str
    taxa: list[tuple[str, ...]]     # lineage paths, one per point
    groups: list[str]               # each taxon's ancestor at color_by, joined with " > "
    total: int                      # taxa at the level before --max-taxa
    perplexity: float
    xy: dict[str, np.ndarray]       # "level_encoder" / "text_encoder" -> (n, 2) t-SNE
    silhouette: dict[str, float]    # same keys, cosine silhouette of the pooled vectors


def embedding_map(pipe, level: int | str, color_by: int | str | None = None,
                  max_taxa: int | None = None, seed: int = 0,
                  perplexity: float | None = None) -> EmbeddingMap:
    """The t-SNE maps and silhouette scores of one level's taxa (module docstring).

    `color_by` is a rank above `level` (default: the rank just above). `max_taxa` keeps a seeded
    random subset of that many taxa (t-SNE of a 10,000-species level takes minutes).
    """
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score
    tax = pipe.taxonomy
    lvl = tax.level_of(level) if isinstance(level, str) else int(level)
    if not 0 < lvl < tax.num_levels:
        raise ValueError(f"--level must be a rank below the top one ({', '.join(tax.ranks[1:])}); "
                         f"got {level!r}")
    by = lvl - 1 if color_by is None else (tax.level_of(color_by) if isinstance(color_by, str)
                                           else int(color_by))
    if not 0 <= by < lvl:
        raise ValueError(f"--color-by must be a rank above {tax.ranks[lvl]} "
                         f"({', '.join(tax.ranks[:lvl])}); got {color_by!r}")
    taxa = tax.vocab(lvl)
    total = len(taxa)
    if max_taxa is not None and total > max_taxa:
        keep = np.random.default_rng(seed).choice(total, max_taxa, replace=False)
        taxa = [taxa[i] for i in sorted(keep)]
    groups = [" > ".join(t.path[: by + 1]) for t in taxa]
    n, n_groups = len(taxa), len(set(groups))
    if not 2 <= n_groups <= n - 1:
        raise ValueError(f"a silhouette score needs 2 to n-1 groups: the {n} {tax.ranks[lvl]} taxa "
                         f"fall into {n_groups} {tax.ranks[by]} group(s); choose another --color-by "
                         f"or --level")
    learned, raw = level_vectors(pipe, lvl, [tax.prompt(t) for t in taxa])
    p = perplexity_for(n, perplexity)
    xy, sil = {}, {}
    for key, x in (("level_encoder", learned), ("text_encoder", raw)):
        sil[key] = float(silhouette_score(x, groups, metric="cosine"))
        xy[key] = TSNE(2, perplexity=p, metric="cosine", init="pca",
                       random_state=seed).fit_transform(x)
    return EmbeddingMap(lvl, by, tax.ranks[lvl], tax.ranks[by], [t.path for t in taxa], groups,
                        total, p, xy, sil)


def plot_embedding_map(m: EmbeddingMap, path: str | Path) -> Path:
    """Two panels (level encoder | text encoder), points coloured by their `color_by` group."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = sorted(set(m.groups))
    # tab10's colours are the most distinct; tab20 (pairs of shades) only when 10 do not suffice
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    colour = {g: cmap(i % cmap.N) for i, g in enumerate(names)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    titles = {"level_encoder": f"level {m.level} encoder ({m.rank})",
              "text_encoder": "frozen text encoder"}
    for ax, key in zip(axes, ("level_encoder", "text_encoder")):
        xy = m.xy[key]
        for g in names:
            idx = [i for i, x in enumerate(m.groups) if x == g]
            ax.scatter(xy[idx, 0], xy[idx, 1], s=14, color=colour[g], label=g.split(" > ")[-1])
        ax.set_title(f"{titles[key]}\nsilhouette by {m.color_rank}: {m.silhouette[key]:.3f}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(names) <= MAX_LEGEND:
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title=m.color_rank)
    shown = f"{len(m.taxa)} of {m.total}" if len(m.taxa) < m.total else f"{len(m.taxa)}"
    fig.suptitle(f"t-SNE of {shown} {m.rank} prompts (perplexity {m.perplexity:g}), coloured by "
                 f"{m.color_rank} ({len(names)} groups)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def embeddings_command(a) -> list[Path]:
    """`taxadiffusion embeddings`: PNG (two t-SNE panels) + JSON (scores) + report section."""
    pipe, _ = load_for_sampling(a.run, None, a.device)
    level = int(a.level) if a.level.isdigit() else a.level
    color_by = None if a.color_by is None else (int(a.color_by) if a.color_by.isdigit() else a.color_by)
    m = embedding_map(pipe, level, color_by, a.max_taxa, a.seed, a.perplexity)
    folder, run_dir = output_folder(a.run, "embeddings", a.out)
    stem = f"{slug(m.rank)}-by-{slug(m.color_rank)}"
    png = plot_embedding_map(m, folder / f"{stem}.png")
    summary = {"run": str(a.run), "level": m.level, "rank": m.rank, "color_by": m.color_rank,
               "n_taxa": len(m.taxa), "total_taxa": m.total, "n_groups": len(set(m.groups)),
               "perplexity": m.perplexity, "seed": a.seed, "silhouette": m.silhouette,
               "pooling": "mean over the prompt's tokens after BOS through EOS",
               "silhouette_metric": "cosine, on the pooled vectors (not the 2-D map)",
               "points": [{"taxon": " > ".join(t), "group": g,
                           **{k: [float(v) for v in m.xy[k][i]] for k in m.xy}}
                          for i, (t, g) in enumerate(zip(m.taxa, m.groups))]}
    js = folder / f"{stem}.json"
    js.write_text(json.dumps(summary, indent=1))
    print(f"wrote {png} and {js}; silhouette by {m.color_rank}: level encoder "
          f"{m.silhouette['level_encoder']:.3f}, text encoder {m.silhouette['text_encoder']:.3f}")
    if run_dir is not None:
        from ..report import rel
        sub = (f" ({len(m.taxa)} of {m.total} taxa, a seeded random subset)"
               if len(m.taxa) < m.total else "")
        publish(run_dir, f"embeddings-{stem}", f"Embedding map: {m.rank} by {m.color_rank}", [
            {"text": f"Each point is one {m.rank} prompt{sub}: left, what level {m.level}'s encoder "
             "gives the UNet; right, the frozen text encoder's embedding of the same prompt. Both "
             "are pooled as the mean over the prompt's tokens after BOS through EOS."},
            {"image": rel(run_dir, png), "caption": f"t-SNE (cosine, perplexity {m.perplexity:g}), "
             f"coloured by {m.color_rank}."},
            {"table": {"columns": ["embedding", f"silhouette by {m.color_rank} (cosine)"],
                       "rows": [["level encoder (learned)", m.silhouette["level_encoder"]],
                                ["text encoder (frozen)", m.silhouette["text_encoder"]]]},
             "caption": "On the pooled vectors, in [-1, 1]; higher: taxa of one group lie closer."}],
            order=REPORT_ORDER)
    return [png, js]
