"""The oracle's reading of trait grids on a synthetic-world run (issue 8): at which column each rank's
trait appears.

    python benchmarks/trait_emergence.py --run runs/demo/progressive [--guidance taxa] [--n 4]

For the demo's trait species (demo.trait_species: 4 few-shot, 4 common), the trait grid (levels
class ... species, the same `--n` seeds in every column) is sampled and scored with
analysis.traits.trait_emergence; the ideal is analysis.traits.emergence_reference. Each species'
sibling grid is read too (analysis.traits.sibling_reading): how often a column shows its own species.
The demo's report shows the same table for its progressive model; this script reads any run of the
synthetic world, e.g. an `all` run from benchmarks/demo_variants.py. Writes <out>/<run name>-<guidance>.json
and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo/progressive")
    ap.add_argument("--guidance", default=None, help="taxa | cfg | none; default: the run's")
    ap.add_argument("--n", type=int, default=4, help="seeds per column")
    ap.add_argument("--out", default="benchmarks/results/trait_emergence")
    a = ap.parse_args()
    from taxadiffusion.analysis.traits import (emergence_table, oracle_emergence, shown_siblings, sibling_grid,
                                               sibling_reading, trait_grid)
    from taxadiffusion.demo import trait_species
    from taxadiffusion.evaluation.oracle import load_or_train_oracle
    from taxadiffusion.evaluation.run import run_world
    from taxadiffusion.sampling import load_for_sampling
    t0 = time.time()
    world = run_world(a.run)
    if world is None:
        raise SystemExit(f"{a.run} was not trained on the synthetic world (no world.json beside its data)")
    pipe, sc = load_for_sampling(a.run)
    pipe.set_progress_bar_config(disable=True)
    oracle = load_or_train_oracle(world)
    species = trait_species(pipe.taxonomy)
    guidance = a.guidance or sc.guidance
    kw = dict(guidance=guidance, guidance_scale=sc.scale, num_inference_steps=sc.steps)
    grids = [trait_grid(pipe, " > ".join(t.path), n=a.n, seed=0, **kw)[0] for t in species]
    lineages = [t.path for t in species]
    measured, ideal = oracle_emergence(oracle, grids, lineages)
    table = emergence_table(measured, ideal, pipe.taxonomy.ranks)
    # the sibling grids read the same way: does each species' column show its own mark?
    readings, own_column = {}, {}
    for t in species:
        name = " > ".join(t.path)
        shown = shown_siblings(pipe, name)[0]
        sib, _, _ = sibling_grid(pipe, name, n=a.n, seed=0, **kw)
        readings[name] = sibling_reading(oracle, sib, shown)
        own_column[name] = readings[name]["own"][shown.index(tuple(t.path))]
    md = [f"# Trait emergence: {a.run}, {guidance} (scale {sc.scale:g}, {sc.steps} steps)", "",
          f"{len(species)} species x {a.n} seeds a cell; measured (ideal). {time.time() - t0:.0f} s.", "",
          "| " + " | ".join(table["columns"]) + " |", "|" + "---|" * len(table["columns"])]
    md += ["| " + " | ".join(map(str, r)) + " |" for r in table["rows"]]
    md += ["", "Sibling grids (all species of the genus, same seeds) read by the oracle: own species in its "
           "own column, on average over the genus's columns, and the guess (1 / siblings).", "",
           "| species | training images | own column | mean over siblings | guess |", "|---|---|---|---|---|"]
    for t in species:
        name = " > ".join(t.path)
        r = readings[name]
        md.append(f"| {t.binomial} | {pipe.taxonomy.count(t)} | {own_column[name]:.2f} | {r['own_mean']:.2f} | "
                  f"{r['guess']:.2f} |")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{Path(a.run).resolve().name}-{guidance}"
    stem.with_suffix(".json").write_text(json.dumps(
        {"run": str(a.run), "guidance": guidance, "scale": sc.scale, "steps": sc.steps, "seeds": a.n,
         "species": [" > ".join(p) for p in lineages], "ranks": list(pipe.taxonomy.ranks),
         "measured": measured.tolist(), "ideal": ideal.tolist(), "siblings": readings,
         "seconds": round(time.time() - t0, 1)},
        indent=1))
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
