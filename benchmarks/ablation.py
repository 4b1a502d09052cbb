"""Ablations on the synthetic world at a fixed compute budget (paper Table 4 and Sec. B.5).

    python benchmarks/ablation.py [--seeds 0 1] [--steps-scale 1] [--strategies progressive all random full]

- Training strategies: progressive vs all vs random vs the flat `full` baseline (lineage as text), each
  from the same pretrained tiny base with the same number of steps (configs/demo.yaml, whose UNet
  trains in every strategy; single-stage strategies get the total budget of the progressive stages,
  stages.py). `lora-text` is accepted too: on this preset it trains the same whole UNet as `full`.
- Guidance: TaxaGuide vs CFG at the same scale, on the progressive model.
- Guidance scale 0, 2, 4, 6, 8, 10 (TaxaGuide), on the progressive model.
Scored by the oracle on species-conditioned samples of every few-shot species and a seeded set of
common ones (16 samples each): accuracy per rank, oracle Frechet distance, species accuracy per
few-shot bucket. Every training seed is a separate run; tables give the mean over seeds and each
seed's value. Writes benchmarks/results/ablation.json and ablation.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from taxadiffusion.config import load_config  # noqa: E402
from taxadiffusion.datasets.synthetic import WorldConfig, write_dataset  # noqa: E402
from taxadiffusion.evaluation.oracle import load_or_train_oracle  # noqa: E402
from taxadiffusion.evaluation.run import evaluate  # noqa: E402
from taxadiffusion.evaluation.tables import BUCKETS, bucket_of  # noqa: E402
from taxadiffusion.stages import plan_stages  # noqa: E402
from taxadiffusion.training import train  # noqa: E402

RANKS = ("class", "order", "family", "genus", "species")


def trained(out: Path, data: Path, strategy: str, seed: int, scale_steps: float) -> Path:
    cfg = load_config("demo", [f"data.root={data}", f"train.output_dir={out}",
                               f"name={strategy}-seed{seed}", f"train.strategy={strategy}",
                               f"train.seed={seed}"])
    cfg.train.steps_stage0 = max(1, int(cfg.train.steps_stage0 * scale_steps))
    cfg.train.steps_per_stage = max(1, int(cfg.train.steps_per_stage * scale_steps))
    last = plan_stages(cfg.train, tuple(cfg.data.ranks))[-1].name
    run = out / cfg.name
    if not (run / "checkpoints" / last / "final" / "state.json").exists():
        train(cfg, resume="latest")
    return run


def score(run: Path, out: Path, species: list[str], guidance: str, scale: float, n: int) -> dict:
    res = evaluate(run, metrics=["oracle"], levels=["species"], species=species, n_per_taxon=n,
                   guidance=guidance, scale=scale, out=out)["oracle"]
    lv = res["levels"]["species"]
    return {"accuracy": lv["accuracy"], "frechet": lv["frechet"],
            "per_species": {" > ".join(t.path): v["species_acc"] for t, v in res["per_species"].items()}}


def summarise(rows: list[dict], counts: dict[str, int]) -> dict:
    """Mean over seeds of each number; bucket means over species first."""
    out = {r: statistics.mean(x["accuracy"][r] for x in rows) for r in RANKS}
    out["frechet"] = statistics.mean(x["frechet"] for x in rows)
    for b in BUCKETS:
        vals = [statistics.mean([v for s, v in x["per_species"].items() if bucket_of(counts[s]) == b] or [float("nan")])
                for x in rows]
        out[f"species acc {b}"] = statistics.mean(vals)
    out["per_seed_species_acc"] = [x["accuracy"]["species"] for x in rows]
    return out


def md_table(title: str, rows: dict[str, dict]) -> list[str]:
    cols = [*(f"{r} acc" for r in RANKS), "oracle Frechet", *(f"species acc {b}" for b in BUCKETS),
            "species acc per seed"]
    lines = [f"### {title}", "", "| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, s in rows.items():
        vals = [*(s[r] for r in RANKS), s["frechet"], *(s[f"species acc {b}"] for b in BUCKETS)]
        cells = [f"{v:.3f}" if v == v else "n/a" for v in vals]
        cells.append(", ".join(f"{v:.3f}" for v in s["per_seed_species_acc"]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--strategies", nargs="+", default=["progressive", "all", "random", "full"])
    ap.add_argument("--scales", type=float, nargs="+", default=[0, 2, 4, 6, 8, 10])
    ap.add_argument("--guidance-scale", type=float, default=None, help="default: the preset's")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's steps")
    ap.add_argument("--n", type=int, default=16, help="samples per species")
    ap.add_argument("--few", type=int, default=12)
    ap.add_argument("--common", type=int, default=8)
    ap.add_argument("--work", default="runs/ablation")
    ap.add_argument("--out", default="benchmarks/results/ablation")
    a = ap.parse_args()
    t0 = time.time()
    work = Path(a.work)
    wc = WorldConfig()
    data = write_dataset(work / "data", wc).parent
    oracle = load_or_train_oracle(wc)
    from taxadiffusion.demo import _select_species
    few, common = _select_species(oracle.world.taxonomy, n_few=a.few, n_common=a.common)
    species = [" > ".join(t.path) for t in few + common]
    tax = oracle.world.taxonomy
    counts = {" > ".join(t.path): tax.count(t) for t in tax.species}
    scale = a.guidance_scale if a.guidance_scale is not None else load_config("demo").sample.scale

    # group -> row name -> one result per training seed
    raw: dict[str, dict[str, list[dict]]] = {"strategy": {}, "guidance": {}, "scale": {}}

    def add(group: str, key: str, run: Path, g: str, s: float) -> None:
        res = score(run, work / "eval" / f"{run.name}-{g}-s{s:g}", species, g, s, a.n)
        raw[group].setdefault(key, []).append(res)
        print(f"[{time.time() - t0:6.0f}s] {group}: {key}, {run.name}: species acc "
              f"{res['accuracy']['species']:.3f}", flush=True)

    for strategy in a.strategies:
        for seed in a.seeds:
            run = trained(work, data, strategy, seed, a.steps_scale)
            g = "cfg" if strategy in ("lora-text", "full") else "taxa"  # a flat model has no levels
            add("strategy", f"{strategy} ({'CFG' if g == 'cfg' else 'TaxaGuide'})", run, g, scale)
            if strategy == "progressive":
                add("guidance", "TaxaGuide", run, "taxa", scale)
                add("guidance", "CFG", run, "cfg", scale)
                for s in a.scales:
                    add("scale", f"s = {s:g}", run, "taxa", s)
    summary = {grp: {k: summarise(v, counts) for k, v in rows.items()} for grp, rows in raw.items()}
    chance = ", ".join(f"{r} {1 / len(tax.vocab(l)):.3f}" for l, r in enumerate(RANKS))
    md = ["# Ablations on the synthetic world", "",
          f"{len(few)} few-shot and {len(common)} common species, {a.n} samples each, training seeds "
          f"{a.seeds}; oracle accuracy per rank on species-conditioned samples (chance, 1 / taxa of the "
          f"rank: {chance}). Budget per run: configs/demo.yaml x {a.steps_scale}. Wall time "
          f"{(time.time() - t0) / 60:.0f} min.", ""]
    md += md_table(f"Training strategy (paper Table 4, top), scale {scale:g}", summary["strategy"])
    md += md_table(f"Guidance on the progressive model (paper Table 4, bottom), scale {scale:g}",
                   summary["guidance"])
    md += md_table("Guidance scale, TaxaGuide on the progressive model (paper Sec. B.5)", summary["scale"])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps({"raw": raw, "summary": summary, "args": vars(a)}, indent=1))
    Path(a.out + ".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
