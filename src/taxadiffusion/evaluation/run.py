"""`taxadiffusion evaluate`: generate (or reuse) images per taxon, measure them, write the tables.

    taxadiffusion evaluate runs/fish --n-per-taxon 50 --levels family genus species --guidance taxa

0. Every metric's network is loaded first (`metric_networks`): a missing Inception, AlexNet or
   BioCLIP file fails in seconds, naming the file, where it was looked for and the option to pass.
1. The model (`sampling.load_for_sampling`) and the real images: by default the run's own training
   data (its config's data section), or another split given with --real/--real-format/--real-root;
   real records whose lineage the model does not know are counted and left out.
2. For every evaluated level, every taxon of that level with real images (or a seeded subset of
   --max-taxa) gets n images, seeded per taxon, saved as PNGs under OUT/samples/ and reused when the
   same settings are asked for again (OUT/settings.json must match, or it is an error).
3. Metrics, each through its library (evaluation/fid.py, lpips.py, bioclip.py, oracle.py, judge.py)
   with its provenance; tables: per level, per class (paper Table S2 layout), few-shot buckets.
4. OUT/metrics.json and OUT/metrics.md (tables.write_metrics), and a report section in the run
   (report_section.add_eval_section: the tables, a sample grid per level, the settings).
"""
from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..config import from_dict
from ..datasets.table import Table
from ..imaging import read_pngs, save_pngs
from ..taxonomy import NONE_NAME, Taxon, Taxonomy
from .tables import few_shot_table, table_s2, taxon_seed, write_metrics

METRICS = ("fid", "lpips", "bioclip", "oracle", "judge")


def _run_config(run: Path):
    from ..checkpoint import resolve_checkpoint
    try:
        return from_dict(json.loads((resolve_checkpoint(run) / "config.json").read_text()))
    except FileNotFoundError:
        return None


def data_world(root: str | Path | None):
    """The synthetic world (WorldConfig) whose dataset folder is `root`, else None: the oracle exists
    for it alone."""
    from ..datasets.synthetic import WorldConfig
    if root is None or not (Path(root) / "world.json").exists():
        return None
    return WorldConfig.load(root)


def run_world(run: str | Path):
    """The synthetic world a run (or checkpoint) was trained on, else None."""
    cfg = _run_config(Path(run))
    return data_world(cfg.data.root) if cfg is not None else None


def real_images(taxonomy: Taxonomy, fmt: str, metadata, root, resolution: int, missing: str,
                max_per_species: int, seed: int = 0, preprocess: str | None = None
                ) -> tuple[dict[Taxon, torch.Tensor], dict[Taxon, list[str]], dict, Table]:
    """({species: uint8 (N, 3, R, R)}, {species: image paths}, counts, the table read), evaluation
    preprocessing. The table is returned for the judge, which trains on all of its records.

    At most `max_per_species` images per species (a seeded draw): FID balancing takes
    min(n_generated, n_real) per taxon anyway, and it bounds memory on large datasets."""
    from ..datasets import read_table
    from ..datasets.images import load_image, PREPROCESS, to_tensor
    from ..imaging import uint8_from_unit
    table = read_table(fmt, metadata, root, ranks=list(taxonomy.ranks), missing=missing)
    fn = PREPROCESS[preprocess or table.preprocess]
    by: dict[Taxon, list[torch.Tensor]] = defaultdict(list)
    paths: dict[Taxon, list[str]] = defaultdict(list)
    counts = {"records": len(table.records), "unknown_lineage": 0, "unreadable": 0, "used": 0,
              "over_cap": 0, "max_per_species": max_per_species}
    chosen: dict[Taxon, list] = defaultdict(list)
    for r in table.records:
        try:
            chosen[taxonomy.make(r.lineage)].append(r)
        except KeyError:
            counts["unknown_lineage"] += 1
    todo = []
    for t, recs in chosen.items():
        if t.level != taxonomy.num_levels - 1:
            counts["unknown_lineage"] += len(recs)  # shorter lineages (missing_ranks=keep)
            continue
        if len(recs) > max_per_species:
            counts["over_cap"] += len(recs) - max_per_species
            recs = random.Random(taxon_seed(seed, t)).sample(recs, max_per_species)
        todo += [(t, r) for r in recs]
    for t, r in tqdm(todo, desc="real images", unit="img", leave=False):
        try:
            img = load_image(r.path)
        except Exception:  # counted: an unreadable real image never stops an evaluation
            counts["unreadable"] += 1
            continue
        by[t].append(uint8_from_unit(to_tensor(fn(img, r.box, resolution, None))))
        paths[t].append(r.path)
        counts["used"] += 1
    return {t: torch.stack(v) for t, v in by.items()}, dict(paths), counts, table


def _taxa_for_level(taxonomy: Taxonomy, level: int, real: dict, max_taxa: int | None, seed: int,
                    only: Sequence[Taxon] | None = None):
    have = {s.path[: level + 1] for s in real}
    allowed = None if only is None else {t.path[: level + 1] for t in only}
    taxa = [t for t in taxonomy.vocab(level) if t.path in have and t.name != NONE_NAME
            and (allowed is None or t.path in allowed)]
    if max_taxa is not None and len(taxa) > max_taxa:
        taxa = sorted(random.Random(seed).sample(taxa, max_taxa))
    return taxa


def sample_dir(out: Path, taxon: Taxon) -> Path:
    """Where `generate` keeps a taxon's PNGs: out/<rank>/<lineage joined by __, spaces as _>/."""
    return Path(out) / taxon.rank / "__".join(taxon.path).replace(" ", "_")


def generate(pipe, taxa: Sequence[Taxon], n: int, out: Path, settings: dict) -> dict[Taxon, torch.Tensor]:
    """n images per taxon, seeded per taxon; PNGs under sample_dir(out, taxon) reused when present."""
    res = {}
    bar = tqdm(total=len(taxa) * n, desc="generating", unit="img")
    for t in taxa:
        d = sample_dir(out, t)
        files = [d / f"{i:04d}.png" for i in range(n)]
        if all(f.exists() for f in files):
            res[t] = read_pngs(files)
        else:
            res[t] = pipe(t, num_images=n, seed=taxon_seed(settings["seed"], t), output_type="uint8",
                          progress=False, **{k: settings[k] for k in (
                              "guidance", "guidance_scale", "guide_level", "num_inference_steps",
                              "batch_size")}).images
            save_pngs(res[t], [f.stem for f in files], d)
        bar.update(n)
    bar.close()
    return res


def oracle_result(oracle, gen: dict[Taxon, torch.Tensor], real: dict[Taxon, torch.Tensor],
                  taxonomy: Taxonomy, settings: dict) -> dict:
    """Oracle accuracy per rank (ranks <= the conditioned level) and oracle Frechet distance per level."""
    from .oracle import oracle_frechet
    from .weights import provenance
    wt = oracle.world.taxonomy
    levels: dict[str, dict] = {}
    per_species: dict[Taxon, dict] = {}
    for lvl in sorted({t.level for t in gen}):
        taxa = [t for t in gen if t.level == lvl]
        hits = torch.zeros(lvl + 1)
        n = 0
        for t in taxa:
            pred = oracle.predict(gen[t])[:, : lvl + 1]
            true = torch.tensor(wt.ids(wt.make(t.path)))
            ok = (pred == true).float()
            hits += ok.sum(0)
            n += len(ok)
            if t.level == taxonomy.num_levels - 1:
                per_species[t] = {"species_acc": float(ok[:, -1].mean()), "genus_acc": float(ok[:, -2].mean())
                                  if lvl else None, "n": len(ok)}
        real_pool = [v for s, v in real.items() if any(s.path[: lvl + 1] == t.path for t in taxa)]
        fd = oracle_frechet(oracle, torch.cat(real_pool), torch.cat([gen[t] for t in taxa]))
        levels[taxonomy.ranks[lvl]] = {"level": lvl, "n_taxa": len(taxa), "n_images": n,
                                       "accuracy": {taxonomy.ranks[i]: float(h / n) for i, h in enumerate(hits)},
                                       "frechet": fd}
    definition = ("Oracle accuracy: the synthetic world's oracle CNN (trained on renders, >=98% species "
                  "accuracy on held-out renders) predicts every rank of each generated image; accuracy "
                  "at rank r is the fraction of images conditioned on a taxon of level >= r whose rank-r "
                  "prediction is that taxon's ancestor. Frechet: torchmetrics FID computed on the "
                  "oracle's trunk features, generated images of the level's taxa vs all real images "
                  "under them.")
    info = {"path": str(oracle.path), "key": oracle.info.get("key"),
            "accuracy_clean": oracle.info.get("accuracy_clean")}
    return {"kind": "oracle", "levels": levels, "per_species": per_species,
            "provenance": provenance("oracle", "torchmetrics", {"oracle": info}, settings,
                                     oracle.size, definition)}


def metric_networks(metrics: Sequence[str], fid_weights=None, alexnet_weights=None,
                    bioclip: str | None = None, device: str | None = None) -> dict:
    """{metric: its loaded network} for fid, lpips and bioclip, loaded before any image is generated:
    a missing or wrong weights file costs seconds, not the hours of sampling before it. Every missing
    file is reported at once (one MissingWeightsError naming each file, where it was looked for and
    the option that gives it), so one rerun fixes them all."""
    from .weights import MissingWeightsError
    loaders = {}
    if "fid" in metrics:
        from .fid import load_inception
        loaders["fid"] = lambda: load_inception(fid_weights, device=device)
    if "lpips" in metrics:
        from .lpips import load_lpips
        loaders["lpips"] = lambda: load_lpips(alexnet_weights, device=device)
    if "bioclip" in metrics:
        from .bioclip import BIOCLIP, load_bioclip
        loaders["bioclip"] = lambda: load_bioclip(bioclip or BIOCLIP, device=device)
    nets, missing = {}, []
    for m, load in loaders.items():
        try:
            nets[m] = load()
        except MissingWeightsError as e:
            missing.append(str(e))
    if len(missing) == 1:
        raise MissingWeightsError(missing[0])
    if missing:
        raise MissingWeightsError(f"{len(missing)} metrics lack their weights (nothing was generated):"
                                  "\n\n" + "\n\n".join(missing))
    return nets


def evaluate(run: str | Path, *, real: str | None = None, real_format: str | None = None,
             real_root: str | None = None, split: str = "train", n_per_taxon: int | None = None,
             levels: Sequence[str] | None = None, max_taxa: int | None = None,
             species: Sequence[str] | None = None,
             metrics: Sequence[str] | None = None, guidance: str | None = None,
             scale: float | None = None, steps: int | None = None, scheduler: str | None = None,
             seed: int = 0, fid_weights=None, alexnet_weights=None, bioclip: str | None = None,
             out: str | Path | None = None, device: str | None = None, pretrained: str | None = None,
             pretrained_option: str | None = None) -> dict:
    """See the module docstring. `pretrained`/`pretrained_option`: sampling.load_for_sampling's."""
    from ..sampling import load_for_sampling
    run = Path(run)
    cfg = _run_config(run)
    data = cfg.data if cfg is not None else None
    if real is None and data is None:
        raise ValueError(f"{run} is a saved pipeline without a run config: pass --real, --real-format "
                         f"and --real-root")
    fmt = real_format or (data.format if data else None)
    if fmt is None:
        raise ValueError(f"{run} is a saved pipeline without a run config: pass --real-format with --real")
    metadata = real if real is not None else data.metadata
    root = real_root or (data.root if data else None)
    world = data_world(root)
    metrics = list(metrics or (["oracle"] if world is not None else ["fid", "lpips", "bioclip"]))
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"unknown metric(s) {bad}; known: {METRICS}")
    if "oracle" in metrics and world is None:
        raise ValueError("the oracle exists for the synthetic world only (no world.json beside "
                         f"the data in {root})")
    nets = metric_networks(metrics, fid_weights, alexnet_weights, bioclip, device)

    pipe, sc = load_for_sampling(run, scheduler, device, pretrained=pretrained,
                                 pretrained_option=pretrained_option)
    pipe.set_progress_bar_config(disable=True)
    tax = pipe.taxonomy
    scale_f = 2 ** (len(pipe.vae.config.block_out_channels) - 1) if pipe.vae is not None else 1
    resolution = pipe.unet.config.sample_size * scale_f
    n = n_per_taxon or (cfg.eval.n_per_taxon if cfg else 50)
    settings = {"guidance": guidance or sc.guidance, "guidance_scale": sc.scale if scale is None else scale,
                "guide_level": sc.guide_level, "num_inference_steps": steps or sc.steps,
                "scheduler": type(pipe.scheduler).__name__, "batch_size": sc.batch_size, "seed": seed,
                "n_per_taxon": n}
    tag = f"{settings['guidance']}-s{settings['guidance_scale']:g}-{settings['num_inference_steps']}" \
          f"{settings['scheduler'].replace('Scheduler', '').lower()}-n{n}-seed{seed}"
    out = Path(out) if out else run / "eval" / tag
    out.mkdir(parents=True, exist_ok=True)
    sfile = out / "settings.json"
    if sfile.exists() and json.loads(sfile.read_text()) != settings:
        raise ValueError(f"{out} holds samples made with other settings ({sfile}); use another --out")
    sfile.write_text(json.dumps(settings, indent=1))

    # -- real images, the trained judges, taxa, generated images --------------------------------------
    real_by, real_paths, counts, real_table = real_images(tax, fmt, metadata, root, resolution,
                                                          data.missing_ranks if data else "fill",
                                                          max_per_species=max(n, 50), seed=seed)
    if not real_by:
        raise ValueError(f"no real image of {fmt} {metadata} matches the model's taxonomy ({counts})")
    if "oracle" in metrics:   # trained (or read from its cache) before sampling, as the weights above
        from .oracle import load_or_train_oracle
        nets["oracle"] = load_or_train_oracle(world)
    if "judge" in metrics:   # trained on the real table's photos (cached): see evaluation/judge.py
        from .judge import load_or_train_judge
        nets["judge"] = load_or_train_judge(real_table, tax, resolution)
    lvls = [tax.level_of(l) if not str(l).isdigit() else int(l) for l in (levels or tax.ranks)]
    only = [tax.lookup(s) for s in species] if species else None
    gen: dict[Taxon, torch.Tensor] = {}
    for lvl in lvls:
        gen.update(generate(pipe, _taxa_for_level(tax, lvl, real_by, max_taxa, seed, only), n,
                            out / "samples", settings))
    species_gen = {t: v for t, v in gen.items() if t.level == tax.num_levels - 1}

    # -- metrics ----------------------------------------------------------------------------------------
    results: dict[str, dict] = {}
    if "oracle" in metrics:
        results["oracle"] = oracle_result(nets["oracle"], gen, real_by, tax, settings)
    if "judge" in metrics:
        from .judge import judge_result
        results["judge"] = judge_result(nets["judge"], gen, real_by, tax, settings, seed=seed)
    if "fid" in metrics:
        from ..backbone import cache_root
        from .fid import fid_by_level, reference_features
        inc = nets["fid"]
        index = {p: (t, i) for t, ps in real_paths.items() for i, p in enumerate(ps)}
        ids = [p for ps in real_paths.values() for p in ps]
        feats = reference_features(
            ids, lambda b: torch.stack([real_by[index[p][0]][index[p][1]] for p in b]),
            cache_dir=cache_root() / "fid-reference", dataset_id=f"{fmt}:{metadata or root}",
            split=split, resolution=resolution, weights=inc, device=device)
        real_feats, k = {}, 0
        for t, ps in real_paths.items():
            real_feats[t] = feats[k:k + len(ps)]
            k += len(ps)
        results["fid"] = fid_by_level(gen, real_feats, lvls, weights=inc, seed=seed, device=device,
                                      feature_source=inc.identity)
    if "lpips" in metrics:
        from .lpips import lpips_diversity, lpips_fidelity
        results["lpips_fidelity"] = lpips_fidelity(nets["lpips"], species_gen, real_by, seed=seed)
        results["lpips_diversity"] = lpips_diversity(nets["lpips"], species_gen, seed=seed)
    if "bioclip" in metrics:
        from .bioclip import bioclip_eval
        results["bioclip"] = bioclip_eval(nets["bioclip"], species_gen, tax)
        results["bioclip_real"] = bioclip_eval(nets["bioclip"], {t: real_by[t] for t in species_gen}, tax)

    # -- tables -----------------------------------------------------------------------------------------
    cols = {}
    if "bioclip" in results:
        cols["BioCLIP"] = (results["bioclip"], "score")
    if "lpips_fidelity" in results:
        cols["LPIPS"] = (results["lpips_fidelity"], "lpips")
    if "oracle" in results and results["oracle"]["per_species"]:
        cols["oracle species acc"] = (results["oracle"], "species_acc")
    if "judge" in results and results["judge"]["per_species"]:
        cols["judge species acc"] = (results["judge"], "species_acc")
    if cols and species_gen:
        results["few_shot"] = few_shot_table(cols, tax)
    group_rank = next((r for l, r in enumerate(tax.ranks) if tax.size(l) > 1), tax.ranks[0])
    if species_gen and any(k in results for k in ("fid", "lpips_fidelity", "bioclip")):
        results["per_class"] = table_s2(tax, group_rank, {t: len(v) for t, v in species_gen.items()},
                                        fid=results.get("fid"), lpips=results.get("lpips_fidelity"),
                                        bioclip=results.get("bioclip"))
    js, md = write_metrics(out, results)
    (out / "real_images.json").write_text(json.dumps(counts, indent=1))
    print(f"real images: {counts}")
    print(f"wrote {js} and {md}")
    from ..checkpoint import resolve_checkpoint
    from .report_section import add_eval_section
    model = run if cfg is None else resolve_checkpoint(run)
    page = add_eval_section(run, out, results, gen, tax, {
        "model": str(model), "metrics": metrics, "levels": [tax.ranks[l] for l in lvls],
        "real images": {"format": fmt, "metadata": metadata, "root": root, **counts}, **settings})
    if page is not None:
        print(f"wrote {page}")
    return results


def evaluate_command(a) -> dict:
    return evaluate(a.run, real=a.real, real_format=a.real_format, real_root=a.real_root,
                    split=a.split, n_per_taxon=a.n_per_taxon, levels=a.levels, max_taxa=a.max_taxa,
                    species=a.species,
                    metrics=a.metrics.split(",") if a.metrics else None, guidance=a.guidance,
                    scale=a.scale, steps=a.steps, scheduler=a.scheduler, seed=a.seed,
                    fid_weights=a.fid_weights, alexnet_weights=a.alexnet_weights, bioclip=a.bioclip,
                    out=a.out, device=a.device, pretrained=a.pretrained, pretrained_option="--pretrained")
