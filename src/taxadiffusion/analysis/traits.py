"""Trait discovery grids: what each rank adds, and what separates sibling taxa (the paper's trait-
discovery application: traits emerge level by level, e.g. family -> genus -> species of Chaetodon).

- `trait_grid`: one lineage sampled at every level 0 ... k with the same seeds. Image i of a request
  draws all its noise from a generator seeded from (seed, i) (pipeline.image_generators), so in the
  grid (rows: image i, columns: levels) a row changes only through the condition: what appears from
  column k-1 to column k is what level k's rank contributes.
- `sibling_grid`: every child of the taxon's parent (for a species: the species of its genus) with
  the same seeds, so the columns differ only in the last rank's name: what separates the siblings.
  At most `max_siblings` columns (the taxon itself is always kept); the total is returned so a
  caller can say how many were left out.

- `trait_emergence`: where a judge can name every rank of an image (the synthetic world's oracle),
  the grid read as numbers: entry [k, r] is how often column k's images (levels 0 ... k) show the
  taxon's own rank-r ancestor. `emergence_reference` is what an ideal model scores: 1 for r <= k (the
  condition names that rank), 1 / (rank-r descendants of the level-k ancestor) for r > k (nothing
  says which one, so a uniform guess). Rank r's trait "appears at column r" when [r, r] reaches the
  reference's 1 while [k, r] for k < r stays near the guess.
- `pixel_changes`: needs no judge, so it reads real-data runs too: how much each column of the level
  grid changes the image from the column before (RMS over pixels, 0-255, same noise), how far
  siblings are apart at the same noise, and, for scale, how far two seeds of one taxon are apart.
  A level whose change is near 0 adds nothing the UNet renders; siblings near 0 are one picture.

- `sibling_reading`: a species' sibling grid read by the oracle: per column how often it shows its
  own species (against the guess 1 / siblings), the right genus, or another sibling's mark.

`taxadiffusion traits RUN --taxon "Chaetodon auriga"` writes both grids (and every image) under
RUN/analysis/traits/<taxon>/ and adds a report section; on a synthetic-world run also the emergence
table and the sibling reading of that taxon, scored by the world's oracle.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from ..imaging import labelled_grid, save_pngs
from ..sampling import load_for_sampling, slug
from . import output_folder, publish, sample_settings

MAX_SIBLINGS = 12
REPORT_ORDER = 60
SIBLING_CAPTION = ("The synthetic world's oracle on the sibling grid: per column the share of its images "
                   "with the right parent, showing the column's own species, and showing another shown "
                   "sibling. Own {own:.2f} on average against a guess of {guess:.2f}: siblings differ only "
                   "in their own rank's trait, so only that trait can lift a column above the guess.")


def level_label(ranks: Sequence[str], names: Sequence[str]) -> str:
    """'species: Corvus corax' for the last name of a lineage prefix, 'genus: Corvus' etc."""
    lvl = len(names) - 1
    if ranks[lvl] == "species" and lvl and ranks[lvl - 1] == "genus":
        return f"species: {names[-2]} {names[-1]}"
    return f"{ranks[lvl]}: {names[-1]}"


def short_label(ranks: Sequence[str], names: Sequence[str]) -> str:
    """A column label that fits a grid cell: 'C. corax' for a species, else the name."""
    lvl = len(names) - 1
    if ranks[lvl] == "species" and lvl and ranks[lvl - 1] == "genus":
        return f"{names[-2][:1]}. {names[-1]}"
    return names[-1]


def column_guide_level(guide_level: int, level: int) -> int:
    """TaxaGuide's reference level for a column sampled at `level`: the requested one where it is an
    ancestor of the column, else the column's parent (level - 1). A grid runs from the top rank down,
    so `--guide-level 3` (guide against the genus) cannot hold for the class ... genus columns; they
    guide against their parent instead (level 0 is CFG in any case: pipeline.reference)."""
    if guide_level < 0:
        raise ValueError(f"guide_level must be >= 0, got {guide_level}")
    return min(guide_level, max(level - 1, 0))


def trait_grid(pipe, taxon: str, n: int = 4, seed: int = 0,
               **sample_kw) -> tuple[torch.Tensor, list[str]]:
    """(images (levels, n, 3, H, W) uint8, one label per level) for levels 0 ... the taxon's.

    `sample_kw` goes to the pipeline (guidance, guidance_scale, num_inference_steps, ...); a
    `guide_level` applies where the column allows it (`column_guide_level`). The same `seed` at every
    level: image i has the same initial and per-step noise in every column.
    """
    names = pipe.resolve_taxon(taxon)
    lineage = " > ".join(names)
    kw = {"progress": False, **sample_kw, "output_type": "uint8"}
    guide = kw.pop("guide_level", 0)
    images = torch.stack([pipe(lineage, level=lvl, num_images=n, seed=seed,
                               guide_level=column_guide_level(guide, lvl), **kw).images
                          for lvl in range(len(names))])
    ranks = pipe.taxonomy.ranks
    return images, [level_label(ranks, names[: lvl + 1]) for lvl in range(len(names))]


def siblings(pipe, taxon: str) -> list[tuple[str, ...]]:
    """Lineages of the taxon's siblings (the children of its parent; level 0: every level-0 taxon),
    itself included, in vocabulary order. An unseen taxon (a path with an unseen tail) is added to
    its known parent's children."""
    tax = pipe.taxonomy
    names = pipe.resolve_taxon(taxon)
    lvl = len(names) - 1
    parent = names[:-1]
    if lvl == 0:
        paths = [t.path for t in tax.vocab(0)]
    elif tax.find(" > ".join(parent)):
        paths = [t.path for t in tax.children(tax.make(parent))]
    else:  # the parent itself is unseen: it has no known children
        paths = []
    if names not in paths:
        paths = sorted([*paths, names])
    return paths


def shown_siblings(pipe, taxon: str, max_siblings: int = MAX_SIBLINGS) -> tuple[list[tuple[str, ...]], int]:
    """(the sibling lineages a grid shows, total number of siblings): at most `max_siblings` in
    vocabulary order, always including the taxon itself."""
    if max_siblings < 1:
        raise ValueError(f"max_siblings must be at least 1, got {max_siblings}")
    names = pipe.resolve_taxon(taxon)
    paths = siblings(pipe, taxon)
    if len(paths) <= max_siblings:
        return paths, len(paths)
    others = [p for p in paths if p != names][: max_siblings - 1]
    return sorted([*others, names]), len(paths)


def sibling_grid(pipe, taxon: str, n: int = 4, seed: int = 0, max_siblings: int = MAX_SIBLINGS,
                 **sample_kw) -> tuple[torch.Tensor, list[str], int]:
    """(images (siblings, n, 3, H, W) uint8, labels, total number of siblings).

    Columns are `shown_siblings` (so `len(labels) < total` means some were left out, and the caller
    should say so); the same `seed` in every column; `guide_level` as in `trait_grid`.
    """
    paths, total = shown_siblings(pipe, taxon, max_siblings)
    kw = {"progress": False, **sample_kw, "output_type": "uint8"}
    kw["guide_level"] = column_guide_level(kw.get("guide_level", 0), len(paths[0]) - 1)
    images = torch.stack([pipe(" > ".join(p), num_images=n, seed=seed, **kw).images for p in paths])
    ranks = pipe.taxonomy.ranks
    return images, [short_label(ranks, p) for p in paths], total


def trait_emergence(predict, grids: Sequence[torch.Tensor], truth: torch.Tensor) -> torch.Tensor:
    """(columns, ranks) accuracy over taxa and seeds: [k, r] = share of column-k images whose rank-r
    prediction is their taxon's rank-r ancestor.

    `predict` maps uint8 images (N, 3, H, W) to (N, ranks) ids (e.g. `Oracle.predict`); `grids` holds
    one `trait_grid` output (columns, n, 3, H, W) per taxon, all with the same number of columns;
    `truth` (taxa, ranks) the taxa's ancestor ids at every rank.
    """
    if len(grids) != len(truth) or not len(grids):
        raise ValueError(f"{len(grids)} grids but {len(truth)} true lineages")
    cols = {g.shape[0] for g in grids}
    if len(cols) != 1:
        raise ValueError(f"grids have different numbers of columns: {sorted(cols)}")
    hits = []
    for g, t in zip(grids, truth):
        c, n = g.shape[:2]
        pred = predict(g.reshape(c * n, *g.shape[2:])).view(c, n, -1)
        hits.append((pred == t.view(1, 1, -1)).float().mean(1))
    return torch.stack(hits).mean(0)


def emergence_reference(taxonomy, lineages: Sequence[Sequence[str]]) -> torch.Tensor:
    """(columns, ranks): what `trait_emergence` gives for a model that renders exactly levels 0 ... k
    and a uniformly drawn descendant below them (averaged over the lineages)."""
    L = len(lineages[0])
    ref = torch.zeros(L, taxonomy.num_levels)
    for names in lineages:
        for k in range(L):
            for r in range(taxonomy.num_levels):
                n = sum(1 for t in taxonomy.vocab(r) if tuple(t.path[: k + 1]) == tuple(names[: k + 1]))
                ref[k, r] += 1.0 if r <= k else 1.0 / max(1, n)
    return ref / len(lineages)


def mean_pairwise_rms(grid: torch.Tensor) -> float:
    """Mean RMS pixel distance (0-255) between the entries of axis 0 of (A, B, 3, H, W), over all pairs
    of axis 0 and every index of axis 1 (a grid: pairs of columns at the same seed)."""
    a = grid.float()
    if a.shape[0] < 2:
        raise ValueError(f"need at least 2 entries on axis 0 to compare, got {a.shape[0]}")
    i, j = torch.triu_indices(a.shape[0], a.shape[0], 1)
    return float(((a[i] - a[j]) ** 2).mean(dim=(-3, -2, -1)).sqrt().mean())


def pixel_changes(levels: torch.Tensor, sibs: torch.Tensor | None = None) -> dict:
    """Judge-free reading of a level grid (levels, n, 3, H, W) and a sibling grid (siblings, n, ...):
    `column`: per column k >= 1 the mean RMS between columns k-1 and k at the same seed; `siblings`:
    mean pairwise RMS between siblings at the same seed (None with fewer than 2); `seeds`: mean
    pairwise RMS between the seeds of the last column, the scale of two different individuals."""
    col = [mean_pairwise_rms(levels[k - 1: k + 1]) for k in range(1, levels.shape[0])]
    sib = mean_pairwise_rms(sibs) if sibs is not None and sibs.shape[0] > 1 else None
    seeds = mean_pairwise_rms(levels[-1][:, None]) if levels.shape[1] > 1 else None
    return {"column": col, "siblings": sib, "seeds": seeds}


def pixel_change_text(changes: dict, labels: Sequence[str]) -> str:
    """'order +12.1, family +8.0, ...; siblings 0.4 apart at the same noise; two seeds of the taxon
    40.2 apart (RMS over pixels, 0-255)'; `labels` name the grid's columns (the first has no change)."""
    parts = [", ".join(f"{lab} +{c:.1f}" for lab, c in zip(labels[1:], changes["column"]))]
    if changes["siblings"] is not None:
        parts.append(f"siblings {changes['siblings']:.1f} apart at the same noise")
    if changes["seeds"] is not None:
        parts.append(f"two seeds of the taxon {changes['seeds']:.1f} apart")
    return "; ".join(p for p in parts if p) + " (RMS over pixels, 0-255)"


def emergence_table(measured: torch.Tensor, reference: torch.Tensor, ranks: Sequence[str]) -> dict:
    """A report table: one row per column of the grid, 'measured (ideal)' per rank."""
    return {"columns": ["condition up to", *[f"{r} acc" for r in ranks]],
            "rows": [[ranks[k], *[f"{measured[k, r]:.2f} ({reference[k, r]:.2f})" for r in range(len(ranks))]]
                     for k in range(measured.shape[0])]}


def seed_grid(images: torch.Tensor, col_labels: Sequence[str], seed: int):
    """Rows: image i (same noise across the row); columns: the first axis of `images`."""
    n, size = images.shape[1], images.shape[-1]
    rows = [images[:, i] for i in range(n)]
    # at least 96 px so labels fit; at most 256 so an SD grid of 5 x 12 stays a viewable size
    return labelled_grid(rows, [f"seed {seed} #{i}" for i in range(n)], list(col_labels),
                         cell=max(96, min(size, 256)))


def oracle_emergence(oracle, grids: Sequence[torch.Tensor],
                     lineages: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(measured, ideal) of species trait grids read by a synthetic world's oracle."""
    return (trait_emergence(oracle.predict, grids, oracle.lineage_ids(lineages)),
            emergence_reference(oracle.world.taxonomy, lineages))


def sibling_reading(oracle, sibs: torch.Tensor, lineages: Sequence[Sequence[str]]) -> dict:
    """A species' sibling grid (siblings, n, 3, H, W) read by a synthetic world's oracle, one row per
    column: the share of its images showing the right genus, its own species, and another shown sibling.
    `lineages`: the columns' whole lineages (species).

    Congeneric species differ only in their mark, so "own" well above the guess (1 / number of
    siblings, for images with the right genus) means the mark separates them; "another sibling" high
    means the column draws a sibling's mark (e.g. the genus's most common one)."""
    if len(sibs) != len(lineages) or len(sibs) < 2:
        raise ValueError(f"need one lineage per sibling column and at least 2 columns, got {len(sibs)} "
                         f"columns and {len(lineages)} lineages")
    truth = oracle.lineage_ids(lineages)                    # (siblings, ranks)
    rows, own = [], []
    for k, (imgs, t) in enumerate(zip(sibs, truth)):
        pred = oracle.predict(imgs)                         # (n, ranks)
        others = torch.cat([truth[:k, -1], truth[k + 1:, -1]])
        hit = (pred[:, -1] == t[-1]).float().mean().item()
        own.append(hit)
        rows.append([lineages[k][-1], f"{(pred[:, -2] == t[-2]).float().mean():.2f}", f"{hit:.2f}",
                     f"{torch.isin(pred[:, -1], others).float().mean():.2f}"])
    ranks = oracle.world.taxonomy.ranks
    return {"own": own, "own_mean": sum(own) / len(own), "guess": 1 / len(sibs),
            "table": {"columns": ["sibling", f"{ranks[-2]} acc", f"own {ranks[-1]}", "another sibling"],
                      "rows": rows}}


def _oracle_of(run, pipe, names):
    """The synthetic world's oracle of a run when `names` is a whole lineage, else None."""
    from ..evaluation.run import run_world
    world = run_world(run)
    if world is None or len(names) != pipe.taxonomy.num_levels:
        return None
    from ..evaluation.oracle import load_or_train_oracle
    return load_or_train_oracle(world)


def _emergence_of(oracle, pipe, names, levels: torch.Tensor) -> dict | None:
    """The emergence table of one species' level grid read by `oracle` (None: no oracle)."""
    if oracle is None:
        return None
    ranks = pipe.taxonomy.ranks
    m, ref = oracle_emergence(oracle, [levels], [names])
    return {"measured": m.tolist(), "ideal": ref.tolist(), "ranks": list(ranks),
            "table": emergence_table(m, ref, ranks),
            "caption": f"The synthetic world's oracle on the level grid ({levels.shape[1]} seeds a column): "
                       "share of column k's images that show the taxon's own ancestor at each rank; in "
                       "brackets what an ideal model scores (1 down to the conditioned rank, a uniform guess "
                       "among the descendants below). A rank's trait appears where its column reaches 1."}


def traits_command(a) -> list[Path]:
    """`taxadiffusion traits`: the level grid and the sibling grid of one taxon, PNGs + report."""
    pipe, sc = load_for_sampling(a.run, a.scheduler, a.device)
    kw = sample_settings(a, sc)
    names = pipe.resolve_taxon(a.taxon)
    ranks = pipe.taxonomy.ranks
    folder, run_dir = output_folder(a.run, "traits", a.out)
    folder = folder / slug(" ".join(names[-2:]))
    guides = None
    if kw["guidance"] == "taxa":  # per column the reference actually used (None: CFG at the top rank)
        guides = {"levels": [column_guide_level(kw["guide_level"], lvl) if lvl else None
                             for lvl in range(len(names))],
                  "siblings": column_guide_level(kw["guide_level"], len(names) - 1) if len(names) > 1 else None}
        moved = [ranks[lvl] for lvl in range(1, len(names)) if guides["levels"][lvl] != kw["guide_level"]]
        if moved:
            print(f"note: --guide-level {kw['guide_level']} is not above the {', '.join(moved)} column(s); "
                  "they guide against their parent instead" +
                  (", and so does the sibling grid" if ranks[len(names) - 1] in moved else ""))

    levels, labels = trait_grid(pipe, a.taxon, a.n, a.seed, **kw)
    for lvl, imgs in enumerate(levels):
        save_pngs(imgs, [f"level{lvl}-seed{a.seed}-{i:04d}" for i in range(a.n)], folder / "images")
    lv_png = folder / f"levels-seed{a.seed}.png"
    seed_grid(levels, [short_label(ranks, names[: lvl + 1]) for lvl in range(len(names))], a.seed).save(lv_png)

    sib, sib_labels, total = sibling_grid(pipe, a.taxon, a.n, a.seed, a.max_siblings, **kw)
    shown, _ = shown_siblings(pipe, a.taxon, a.max_siblings)
    for p, imgs in zip(shown, sib):
        save_pngs(imgs, [f"{slug(p[-1])}-seed{a.seed}-{i:04d}" for i in range(a.n)],
                  folder / "siblings")
    sib_png = folder / f"siblings-seed{a.seed}.png"
    seed_grid(sib, sib_labels, a.seed).save(sib_png)

    oracle = _oracle_of(a.run, pipe, names)
    emergence = _emergence_of(oracle, pipe, names, levels)
    reading = sibling_reading(oracle, sib, shown) if oracle is not None and len(shown) > 1 else None
    changes = pixel_changes(levels, sib)
    change_text = pixel_change_text(changes, ranks[: len(names)])

    note = (f"showing {len(sib_labels)} of {total} siblings (--max-siblings {a.max_siblings}; the "
            f"taxon itself and the first others in name order)" if total > len(sib_labels) else
            f"all {total} siblings")
    settings = {"run": str(a.run), "taxon": " > ".join(names), "n": a.n, "seed": a.seed,
                "scheduler": type(pipe.scheduler).__name__, **kw, "levels": labels,
                "siblings": sib_labels, "siblings_total": total, "reference_levels": guides,
                "pixel_changes": changes,
                "sibling_oracle": reading}
    (folder / "settings.json").write_text(json.dumps(settings, indent=1))
    print(f"wrote {lv_png} and {sib_png} ({note})")
    print("pixel change per column: " + change_text)
    if emergence is not None:
        (folder / f"emergence-seed{a.seed}.json").write_text(json.dumps(emergence, indent=1))
        print("oracle accuracy per column, measured (ideal):")
        for row in emergence["table"]["rows"]:
            print("  up to " + " | ".join(map(str, row)))
    if reading is not None:
        print(f"oracle on the sibling grid (own {ranks[-1]}: mean {reading['own_mean']:.2f}, "
              f"guess {reading['guess']:.2f}):")
        for row in reading["table"]["rows"]:
            print("  " + " | ".join(map(str, row)))

    if run_dir is not None:
        from ..report import rel
        parent = level_label(ranks, names[:-1]) if len(names) > 1 else "the top rank"
        publish(run_dir, f"traits-{slug(' '.join(names))}", f"Trait discovery: {labels[-1]}", [
            {"text": "Lineage: " + " > ".join(names) + ". Each row is one image's noise (seed "
             f"{a.seed}, image #i), identical in every column, so a row changes only through the "
             "condition."},
            {"image": rel(run_dir, lv_png), "caption": "Columns: the context summed over levels 0 ... k "
             "for k = " + ", ".join(labels) + ". What appears from one column to the next is what "
             "that rank adds."},
            {"image": rel(run_dir, sib_png), "caption": f"Siblings under {parent}: " +
             ", ".join(sib_labels) + f" ({note}). The columns differ only in the last rank's name."},
            {"text": "What each column changes, without a judge: " + change_text + ". A column near 0 "
             "adds nothing the model renders; siblings near 0 are one picture under several names."},
            *([{"table": emergence["table"], "caption": emergence["caption"]}] if emergence else []),
            *([{"table": reading["table"], "caption": SIBLING_CAPTION.format(
                own=reading["own_mean"], guess=reading["guess"])}] if reading else []),
            {"pre": json.dumps(settings, indent=1)}], order=REPORT_ORDER)
    return [lv_png, sib_png]
