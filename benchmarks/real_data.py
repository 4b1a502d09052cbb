"""benchmarks/ablation.py's comparison on a real dataset given by path (paper Table 4, on photos).

    python benchmarks/real_data.py --data ../shared/data/cub-birds --metrics judge
    python benchmarks/real_data.py --data DIR --resolution 64 --metrics fid,lpips,bioclip,judge \\
        --fid-weights weights-inception-2015-12-05-6726825d.pth --alexnet-weights alexnet-owt-7be5be79.pth \\
        --bioclip /path/to/bioclip

- Training strategies: progressive vs all vs random vs lora-text, each trained FROM SCRATCH with
  configs/tiny-cpu.yaml on DIR (data.root=DIR, data.resolution, the strategy, the seed); single-stage
  strategies get the progressive plan's total steps (stages.py). Runs are resumable: a finished run is
  reused, a killed one continues from its latest checkpoint (train(resume="latest")). lora-text's text
  encoder is the tiny random one, frozen: its prompts are distinct codes, not language.
- Guidance: TaxaGuide vs CFG at the same scale, on the progressive model.
Each model is evaluated by `taxadiffusion.evaluation.run.evaluate` at a higher level (default family)
and at species, `--n` samples per taxon, with the requested metrics: FID/KID by level (Inception),
LPIPS fidelity/diversity (AlexNet), BioCLIP score (BioCLIP), and the judge (evaluation/judge.py: a
small CNN trained on DIR's own photos; no downloaded weights). The oracle of the synthetic world does
not exist here. Weights are never downloaded or faked: a requested metric whose weights are missing
stops the script with the library's MissingWeightsError BEFORE any training. The judge is trained up
front too, and its held-out accuracy per rank (the ceiling for generated-image accuracy) is reported.
Tables: rows are methods (mean over training seeds), columns the metrics per level; a "real photos"
row gives the references (judge held-out accuracy, BioCLIP score of the real images).
Writes benchmarks/results/real_data.json and real_data.md (--out).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from taxadiffusion.config import Config, load_config  # noqa: E402
from taxadiffusion.evaluation.weights import MissingWeightsError  # noqa: E402
from taxadiffusion.stages import plan_stages  # noqa: E402

METRICS = ("fid", "lpips", "bioclip", "judge")
BUCKETS = ("1", "2-5", "6-20", ">20")   # evaluation.tables.BUCKETS (kept torch-free here)


def check_weights(metrics: Sequence[str], fid_weights: str | None = None, alexnet_weights: str | None = None,
                  bioclip: str | None = None) -> dict[str, str]:
    """The weights file(s) of every requested metric, found with the metric's own look-up; the library's
    MissingWeightsError (it names the file, where it looked and how to get it) when one is absent."""
    found = {}
    if "fid" in metrics:
        from taxadiffusion.evaluation.fid import inception_weights_path
        found["fid"] = str(inception_weights_path(fid_weights))
    if "lpips" in metrics:
        from taxadiffusion.evaluation.lpips import alexnet_weights_path
        found["lpips"] = str(alexnet_weights_path(alexnet_weights))
    if "bioclip" in metrics:
        from taxadiffusion.evaluation.bioclip import BIOCLIP, bioclip_files
        found["bioclip"] = " + ".join(str(p) for p in bioclip_files(bioclip or BIOCLIP))
    return found


def run_config(a: argparse.Namespace, strategy: str, seed: int) -> Config:
    cfg = load_config("tiny-cpu", [f"data.format={a.format}", f"data.root={a.data}",
                                   f"data.resolution={a.resolution}", f"train.output_dir={a.work}",
                                   f"name={strategy}-seed{seed}", f"train.strategy={strategy}",
                                   f"train.seed={seed}"])
    cfg.train.steps_stage0 = max(1, int(cfg.train.steps_stage0 * a.steps_scale))
    cfg.train.steps_per_stage = max(1, int(cfg.train.steps_per_stage * a.steps_scale))
    return cfg


def trained(cfg: Config) -> Path:
    """The run folder of `cfg`, trained (or resumed) unless its last stage has finished."""
    from taxadiffusion.training import train
    last = plan_stages(cfg.train, tuple(cfg.data.ranks))[-1].name
    run = Path(cfg.train.output_dir) / cfg.name
    if not (run / "checkpoints" / last / "final" / "state.json").exists():
        train(cfg, resume="latest")
    return run


def judge_up_front(cfg: Config):
    """Train (or load) the judge before any diffusion training: the same table, taxonomy and
    resolution evaluate() will use, so evaluate() finds it in the cache."""
    from taxadiffusion.datasets import read_table
    from taxadiffusion.evaluation.judge import load_or_train_judge
    d = cfg.data
    table = read_table(d.format, d.metadata, d.root, ranks=d.ranks, missing=d.missing_ranks, strict=d.strict)
    return load_or_train_judge(table, table.taxonomy(d.species_prompt), d.resolution)


def numbers(res: dict, levels: Sequence[str]) -> dict[str, float | None]:
    """One method's row: every reported metric per level, flat."""
    row: dict[str, float | None] = {}
    for rank in levels:
        if "fid" in res:
            lv = res["fid"]["levels"].get(rank, {})
            row[f"FID {rank}"], row[f"KID {rank}"] = lv.get("fid"), lv.get("kid_mean")
        if "judge" in res:
            lv = res["judge"]["levels"][rank]
            row[f"judge acc {rank}"] = lv["accuracy"][rank]
            row[f"judge FID {rank}"], row[f"judge KID {rank}"] = lv["fid"], lv["kid_mean"]
    if "lpips_fidelity" in res:
        row["LPIPS fidelity"] = res["lpips_fidelity"]["mean_over_species"]
        row["LPIPS diversity"] = res["lpips_diversity"]["mean_over_species"]
    if "bioclip" in res:
        row["BioCLIP score"] = res["bioclip"]["score_mean_over_species"]
        row["BioCLIP top-1"] = res["bioclip"]["top1_mean_over_species"]
    for r in res.get("few_shot", {}).get("rows", []):
        if "judge species acc" in r:
            row[f"judge species acc [{r['bucket']}]"] = r["judge species acc"]
    return row


def summarise(rows: list[dict]) -> dict:
    """Mean over training seeds of each number (None when a seed lacks it), and each seed's value."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = {}
    for k in keys:
        vals = [r.get(k) for r in rows]
        out[k] = statistics.mean(vals) if all(v is not None for v in vals) else None
        out[f"{k} per seed"] = vals
    return out


def md_table(title: str, rows: dict[str, dict], cols: Sequence[str]) -> list[str]:
    cols = [c for c in cols if any(c in r for r in rows.values())]
    lines = [f"### {title}", "", "| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, s in rows.items():
        lines.append(f"| {name} | " + " | ".join("-" if s.get(c) is None else f"{s[c]:.4g}" for c in cols)
                     + " |")
    return lines + [""]


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="image root holding metadata.csv (generic CSV)")
    ap.add_argument("--format", default="csv", help="metadata format (datasets.READERS)")
    ap.add_argument("--resolution", type=int, choices=(32, 64), default=32)
    ap.add_argument("--metrics", default="fid,lpips,bioclip,judge",
                    help="comma list of " + ",".join(METRICS) + " (no weights needed: judge)")
    ap.add_argument("--fid-weights", default=None)
    ap.add_argument("--alexnet-weights", default=None)
    ap.add_argument("--bioclip", default=None, help="hf-hub:imageomics/bioclip (local cache) or a folder")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--strategies", nargs="+", default=["progressive", "all", "random", "lora-text"])
    ap.add_argument("--levels", nargs="+", default=["family", "species"])
    ap.add_argument("--guidance-scale", type=float, default=None, help="default: the preset's")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's steps")
    ap.add_argument("--n", type=int, default=8, help="samples per taxon")
    ap.add_argument("--max-taxa", type=int, default=None, help="seeded subset of taxa per level")
    ap.add_argument("--work", default=None, help="default: runs/real_data/<data folder>-r<resolution>")
    ap.add_argument("--out", default="benchmarks/results/real_data")
    a = ap.parse_args(argv)
    metrics = [m for m in a.metrics.split(",") if m]
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        ap.error(f"unknown metric(s) {bad}; choose from {','.join(METRICS)}")
    # 1. weights first: a missing file must stop us before hours of training
    weights = check_weights(metrics, a.fid_weights, a.alexnet_weights, a.bioclip)
    a.work = a.work or str(Path("runs/real_data") / f"{Path(a.data).resolve().name}-r{a.resolution}")
    t0 = time.time()
    base = run_config(a, a.strategies[0], a.seeds[0])
    unknown = [l for l in a.levels if l not in base.data.ranks]
    if unknown:
        ap.error(f"--levels {unknown} are not modelled ranks ({', '.join(base.data.ranks)})")
    scale = a.guidance_scale if a.guidance_scale is not None else base.sample.scale
    ceiling = None
    if "judge" in metrics:   # 2. the judge, also before diffusion training
        judge = judge_up_front(base)
        ceiling = {k: judge.info.get(k) for k in ("held_out_accuracy", "held_out_majority_baseline",
                                                   "train_accuracy", "split", "train_seconds", "key")}
        print(f"[{time.time() - t0:6.0f}s] judge {'trained' if judge.trained else 'loaded'}: held-out "
              f"accuracy {json.dumps(ceiling['held_out_accuracy'])}", flush=True)

    raw: dict[str, dict[str, list[dict]]] = {"strategy": {}, "guidance": {}}
    reference: dict[str, float | None] = {}
    done: dict[tuple, dict] = {}

    def add(group: str, key: str, run: Path, g: str) -> None:
        if (run, g) not in done:
            res = evaluate(run, metrics=metrics, levels=a.levels, n_per_taxon=a.n, max_taxa=a.max_taxa,
                           guidance=g, scale=scale, out=Path(a.work) / "eval" / f"{run.name}-{g}-s{scale:g}",
                           fid_weights=a.fid_weights, alexnet_weights=a.alexnet_weights, bioclip=a.bioclip)
            done[run, g] = numbers(res, a.levels)
            if "bioclip_real" in res:
                reference["BioCLIP score"] = res["bioclip_real"]["score_mean_over_species"]
                reference["BioCLIP top-1"] = res["bioclip_real"]["top1_mean_over_species"]
        raw[group].setdefault(key, []).append(done[run, g])
        print(f"[{time.time() - t0:6.0f}s] {group}: {key}, {run.name}: {json.dumps(done[run, g])}", flush=True)

    from taxadiffusion.evaluation.run import evaluate
    for strategy in a.strategies:
        for seed in a.seeds:
            run = trained(run_config(a, strategy, seed))
            g = "cfg" if strategy == "lora-text" else "taxa"   # a flat model has no ancestor levels
            add("strategy", f"{strategy} ({'CFG' if g == 'cfg' else 'TaxaGuide'})", run, g)
            if strategy == "progressive":
                add("guidance", "TaxaGuide", run, "taxa")
                add("guidance", "CFG", run, "cfg")

    summary = {grp: {k: summarise(v) for k, v in rows.items()} for grp, rows in raw.items()}
    if ceiling and ceiling["held_out_accuracy"]:
        for rank in a.levels:
            reference[f"judge acc {rank}"] = ceiling["held_out_accuracy"][rank]
    cols = [*(f"{m} {r}" for m in ("FID", "KID") for r in a.levels), "LPIPS fidelity", "LPIPS diversity",
            "BioCLIP score", "BioCLIP top-1", *(f"judge acc {r}" for r in a.levels),
            *(f"judge {m} {r}" for m in ("FID", "KID") for r in a.levels)]
    few_cols = [f"judge species acc [{b}]" for b in BUCKETS]
    ref_row = {"real photos (reference)": reference} if reference else {}
    md = [f"# The ablation on real photos: {a.data}", "",
          f"Trained from scratch with configs/tiny-cpu.yaml x {a.steps_scale} steps at {a.resolution} px; "
          f"training seeds {a.seeds}; {a.n} samples per taxon at {', '.join(a.levels)}"
          + (f" (at most {a.max_taxa} taxa per level)" if a.max_taxa else "") + f"; guidance scale {scale:g}. "
          f"Metrics: {', '.join(metrics)}. Values: mean over seeds (per seed in real_data.json). "
          f"Wall time {(time.time() - t0) / 60:.0f} min.", ""]
    if ceiling:
        s = ceiling["split"]
        md += [f"Judge (evaluation/judge.py, key {ceiling['key']}): held-out accuracy on real photos "
               f"{json.dumps(ceiling['held_out_accuracy'])}; majority-label baseline "
               f"{json.dumps(ceiling['held_out_majority_baseline'])}; {s['train_images']} training and "
               f"{s['held_out_images']} held-out images of {s['species']} species ({s['species_single_image']} "
               f"with one image, training only). Generated-image judge accuracies are read against the "
               f"held-out accuracy (the 'real photos' row): with a few photos per species it is low.", ""]
    md += md_table(f"Training strategy (paper Table 4, top), scale {scale:g}", {**summary["strategy"], **ref_row},
                   cols)
    md += md_table(f"Guidance on the progressive model (paper Table 4, bottom), scale {scale:g}",
                   {**summary["guidance"], **ref_row}, cols)
    if "judge" in metrics:
        md += md_table("Judge species accuracy by few-shot bucket (training images per species)",
                       summary["strategy"], few_cols)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    doc = {"raw": raw, "summary": summary, "reference": reference, "judge": ceiling, "weights": weights,
           "args": vars(a), "wall_seconds": round(time.time() - t0)}
    Path(a.out + ".json").write_text(json.dumps(doc, indent=1))
    Path(a.out + ".md").write_text("\n".join(md))
    print("\n".join(md))
    return doc


if __name__ == "__main__":
    try:
        main()
    except MissingWeightsError as e:   # the library's message as is: which file, where, how to get it
        sys.exit(f"real_data.py: {e}\n(or leave that metric out: --metrics judge needs no weights)")
