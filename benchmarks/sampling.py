"""Samplers and guidance on a trained synthetic-world run, scored by the oracle (issue 5).

    python benchmarks/sampling.py [--run runs/demo/progressive] [--n 16]

Rows: 25-step DPM-Solver++ vs 250-step DDPM vs 25-step DDIM (TaxaGuide), and TaxaGuide vs CFG at the
same scale; columns: oracle accuracy per rank, oracle Frechet, seconds per image (median over species).
The run must be trained on the synthetic world (make demo trains runs/demo/progressive).
Writes benchmarks/results/sampling.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from taxadiffusion.evaluation.run import evaluate  # noqa: E402

RANKS = ("class", "order", "family", "genus", "species")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo/progressive")
    ap.add_argument("--n", type=int, default=16, help="samples per species")
    ap.add_argument("--scale", type=float, default=None, help="default: the run's")
    ap.add_argument("--out", default="benchmarks/results/sampling")
    a = ap.parse_args()
    from taxadiffusion.demo import _select_species
    from taxadiffusion.taxonomy import Taxonomy
    run = Path(a.run)
    tax = Taxonomy.load(run / "taxonomy.json")
    few, common = _select_species(tax, n_few=8, n_common=8)
    species = [" > ".join(t.path) for t in few + common]
    variants = [("DPM-Solver++ 25 steps, TaxaGuide", "dpm++", 25, "taxa"),
                ("DDPM 250 steps, TaxaGuide", "ddpm", 250, "taxa"),
                ("DDIM 25 steps, TaxaGuide", "ddim", 25, "taxa"),
                ("DPM-Solver++ 25 steps, CFG", "dpm++", 25, "cfg")]
    rows = {}
    for label, sched, steps, g in variants:
        t0 = time.perf_counter()
        out = run / "eval" / f"bench-{sched}{steps}-{g}"
        fresh = not (out / "metrics.json").exists()
        res = evaluate(run, metrics=["oracle"], levels=["species"], species=species, n_per_taxon=a.n,
                       guidance=g, scale=a.scale, steps=steps, scheduler=sched, out=out)["oracle"]
        lv = res["levels"]["species"]
        secs = (time.perf_counter() - t0) / (len(species) * a.n) if fresh else None
        rows[label] = {**{r: lv["accuracy"][r] for r in RANKS}, "frechet": lv["frechet"],
                       "s_per_image_incl_scoring": secs}
        print(label, json.dumps(rows[label]), flush=True)
    md = ["| sampler | " + " | ".join(f"{r} acc" for r in RANKS) + " | oracle Frechet | s/image |",
          "|---" * (len(RANKS) + 3) + "|"]
    for label, r in rows.items():
        s = f"{r['s_per_image_incl_scoring']:.2f}" if r["s_per_image_incl_scoring"] else "(reused)"
        md.append(f"| {label} | " + " | ".join(f"{r[k]:.3f}" for k in RANKS) + f" | {r['frechet']:.1f} | {s} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps({"run": str(run), "n": a.n, "species": species,
                                                  "rows": rows}, indent=1))
    Path(a.out + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
