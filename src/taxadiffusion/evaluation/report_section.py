"""The report section an evaluation adds to its run: the tables of metrics.md and a few samples per level.

`add_eval_section` is called by `evaluate` once metrics.json is written. The section (report/
eval-<eval folder>.json) holds, for every metric computed, its per-level table, the per-species means,
the per-class table (paper Table S2 layout) and the few-shot buckets, one grid PNG of generated samples
per evaluated level (saved in the eval folder, linked relative to the run, so the page survives a copy
of the run folder), and the settings; report.html is then rebuilt. A saved pipeline that sits in no run
folder has no report: the tables stay in the eval folder's metrics.md, and a note says so.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..taxonomy import Taxon, Taxonomy
from .tables import to_jsonable

GRID_TAXA = 6       # rows of a level's sample grid (the first taxa of the level, in taxonomy order)
GRID_SAMPLES = 8    # columns: the first samples of each taxon (seeded per taxon: the same on a rerun)
ORDER = 60          # after the demo's and training's sections (data 10, loss 20, traits 30, samples 40)


def _table(rows: Sequence[Mapping[str, Any]], caption: str, cols: Sequence[str] | None = None) -> dict:
    """A report table block from row dicts (columns: `cols`, else every key in first-seen order)."""
    cols = list(cols or dict.fromkeys(k for r in rows for k in r))
    return {"table": {"columns": cols, "rows": [[r.get(c) for c in cols] for r in rows]},
            "caption": caption}


def _level_blocks(results: Mapping[str, Mapping]) -> list[dict]:
    """One table per metric that is computed per conditioned level (FID/KID, oracle, judge)."""
    out = []
    if "fid" in results:
        rows = [{"conditioned on": e.get("rank"), "taxa": e.get("n_taxa"), "generated": e.get("n_gen"),
                 "real": e.get("n_real"), "FID": e.get("fid"), "FID small n": e.get("fid_small_n"),
                 "KID": e.get("kid_mean"), "KID std": e.get("kid_std")}
                for e in results["fid"]["levels"].values()]
        out.append(_table(rows, "FID and KID per level (torch-fidelity Inception-v3; generated images "
                                "of the level's taxa vs the real images under them, matched per taxon). "
                                "FID small n: no more samples than feature dims, read KID instead."))
    for key, name in (("oracle", "oracle"), ("judge", "judge")):
        if key not in results:
            continue
        res = results[key]
        rows = []
        for rank, e in res["levels"].items():
            row = {"conditioned on": rank, "taxa": e["n_taxa"], "images": e["n_images"],
                   **{f"{r} acc": v for r, v in e["accuracy"].items()}}
            if key == "oracle":
                row["oracle Frechet"] = e["frechet"]
            else:
                row.update({"judge FID": e.get("fid"), "judge KID": e.get("kid_mean")})
            rows.append(row)
        acc = list(dict.fromkeys(f"{r} acc" for e in res["levels"].values() for r in e["accuracy"]))
        tail = ["oracle Frechet"] if key == "oracle" else ["judge FID", "judge KID"]
        cap = (f"{name.capitalize()} accuracy per rank of images conditioned on each level (the rank-r "
               f"prediction is the conditioned taxon's rank-r ancestor).")
        out.append(_table(rows, cap, ["conditioned on", "taxa", "images", *acc, *tail]))
        if key == "judge":
            c = res["ceiling"]
            ceil = [{"": label, **{f"{r} acc": v for r, v in (c.get(k) or {}).items()}}
                    for label, k in (("held-out real photos", "held_out_accuracy"),
                                     ("majority-label baseline", "held_out_majority_baseline"))]
            out.append(_table(ceil, "The judge's ceiling: its accuracy on held-out real photos, the "
                                    "bound the accuracies above are read against."))
    return out


def _species_block(results: Mapping[str, Mapping]) -> list[dict]:
    """The per-species metrics averaged over species (LPIPS, BioCLIP), one row each."""
    rows = []
    for key, label, field in (("lpips_fidelity", "LPIPS fidelity (lower: closer to real)", "mean_over_species"),
                              ("lpips_diversity", "LPIPS diversity (higher: more diverse)", "mean_over_species"),
                              ("bioclip", "BioCLIP score, generated", "score_mean_over_species"),
                              ("bioclip", "BioCLIP zero-shot top-1, generated", "top1_mean_over_species"),
                              ("bioclip_real", "BioCLIP score, real images", "score_mean_over_species"),
                              ("bioclip_real", "BioCLIP zero-shot top-1, real images", "top1_mean_over_species")):
        if key in results:
            r = results[key]
            rows.append({"metric": label, "mean over species": r.get(field),
                         "species": r.get("n_species"), "skipped": r.get("n_skipped")})
    return [_table(rows, "Per-species metrics, averaged over species (species equally weighted).")] if rows else []


def sample_grids(out: Path, gen: Mapping[Taxon, torch.Tensor], taxonomy: Taxonomy) -> list[tuple[Path, str]]:
    """One PNG per evaluated level under `out` (grid-<rank>.png): the first GRID_TAXA taxa of the
    level, GRID_SAMPLES samples each. Returns (file, caption) pairs, coarsest level first."""
    from ..imaging import labelled_grid
    res = []
    for lvl in sorted({t.level for t in gen}):
        taxa = sorted(t for t in gen if t.level == lvl)
        shown = taxa[:GRID_TAXA]
        rows = [gen[t][:GRID_SAMPLES] for t in shown]
        labels = [t.binomial for t in shown]
        rank = taxonomy.ranks[lvl]
        f = Path(out) / f"grid-{rank}.png"
        labelled_grid(rows, labels, [f"#{i}" for i in range(max(len(r) for r in rows))],
                      cell=max(64, rows[0].shape[-1])).save(f)
        res.append((f, f"Conditioned on {rank}: {len(shown)} of {len(taxa)} evaluated {rank} taxa "
                       f"(taxonomy order), the first {min(GRID_SAMPLES, len(gen[shown[0]]))} samples each."))
    return res


def add_eval_section(run: str | Path, out: Path, results: Mapping[str, Mapping],
                     gen: Mapping[Taxon, torch.Tensor], taxonomy: Taxonomy, info: Mapping[str, Any]
                     ) -> Path | None:
    """Add (or replace) this evaluation's report section and rebuild report.html; None (and a printed
    note) when `run` is a saved pipeline outside any run folder. `info`: the settings shown."""
    from ..analysis import find_run_folder, publish
    from ..report import rel
    run_dir = find_run_folder(run)
    if run_dir is None:
        print(f"note: {run} is not inside a training run folder (config.yaml + checkpoints/), so there "
              f"is no report to add this evaluation to; its tables are in {out / 'metrics.md'}")
        return None
    where = rel(run_dir, out)
    blocks: list[dict] = [{"text": f"Generated with the settings below; every number with its "
                                   f"definition and provenance: {where}/metrics.md and metrics.json."}]
    blocks += _level_blocks(results)
    blocks += _species_block(results)
    if "per_class" in results:
        blocks.append(_table(results["per_class"]["rows"], results["per_class"]["definition"]))
    if "few_shot" in results:
        blocks.append(_table(results["few_shot"]["rows"], results["few_shot"]["definition"]))
    blocks += [{"image": rel(run_dir, f), "caption": cap} for f, cap in sample_grids(out, gen, taxonomy)]
    shown = {**info, "eval folder": where}
    if "model" in shown:   # the checkpoint evaluated, as a path inside the run
        shown["model"] = rel(run_dir, shown["model"])
    blocks.append({"pre": json.dumps(shown, indent=1, default=str)})
    key = "eval-" + (re.sub(r"[^A-Za-z0-9-]+", "_", where).strip("_") or "eval")
    model = rel(run_dir, run)
    title = f"Evaluation {out.name}" + ("" if model == "." else f" ({model})")
    return publish(run_dir, key, title, to_jsonable(blocks), order=ORDER)  # NaN -> None: strict JSON
