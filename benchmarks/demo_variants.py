"""One variant of the demo's training, scored like the demo: for measuring what moves the oracle.

    python benchmarks/demo_variants.py --name lr1e-2 train.lr=1e-2
    python benchmarks/demo_variants.py --name long-flat model.pretrained_unet=runs/tiny-base-2 \\
        train.strategy=lora-text train.steps_stage0=540 train.steps_per_stage=180

Trains `configs/demo.yaml` plus the given dotted overrides on the demo's synthetic world (written to
--out/data if absent; validation grids off), then scores TaxaGuide and CFG samples of the demo's 16
species (8 one-shot, 8 common; --n each) with the oracle, as README "What a 5-minute CPU training
run can and cannot show" reports them. Resumable: a finished training is reused.
Writes <out>/<name>/variant.json (overrides, minutes, accuracies per rank, Frechet, fixed-batch loss).

    --world rotation=5 --world "scale=[0.95, 1.05]"   another world (the difficulty dial, WorldConfig);
                                                     its data goes to <out>/data-<world hash>
    --checkpoint checkpoints/stage-0-all/step-720    score this checkpoint of an existing run (EMA
                                                     weights, as saved) instead of training and scoring
                                                     the final one: a learning curve
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
    ap.add_argument("--name", required=True)
    ap.add_argument("--out", default="runs/variants")
    ap.add_argument("--n", type=int, default=8, help="samples per species")
    ap.add_argument("--world", action="append", default=[], metavar="KEY=VALUE",
                    help="WorldConfig field (YAML value), repeatable; default: the demo's world")
    ap.add_argument("--checkpoint", help="checkpoint folder relative to the run to score instead of the final")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.lr=1e-2")
    a = ap.parse_args()
    import yaml

    from taxadiffusion.config import load_config
    from taxadiffusion.datasets.synthetic import WorldConfig, write_dataset
    from taxadiffusion.demo import _select_species
    from taxadiffusion.evaluation.run import evaluate
    from taxadiffusion.taxonomy import Taxonomy
    from taxadiffusion.training import train
    out = Path(a.out).resolve()
    world = {}
    for kv in a.world:
        key, sep, value = kv.partition("=")
        if not sep:
            raise SystemExit(f"--world expects KEY=VALUE, got {kv!r}")
        world[key] = yaml.safe_load(value)
    wc = WorldConfig.from_dict({**WorldConfig().to_dict(), **world})
    data = out / ("data" if wc == WorldConfig() else f"data-{wc.hash()}")
    write_dataset(data, wc, progress=True)  # idempotent; concurrent runs wait for one writer
    cfg = load_config("demo", [f"data.root={data}", f"train.output_dir={out}", f"name={a.name}",
                               "train.validation_seeds=0", *a.overrides])
    t0 = time.time()
    if a.checkpoint:  # score an existing checkpoint as it is: no training, even if the run is unfinished
        run = Path(cfg.train.output_dir) / cfg.name
        if not (run / a.checkpoint / "state.json").exists():
            raise SystemExit(f"{run / a.checkpoint} is not a checkpoint (no state.json)")
    else:
        run = train(cfg, resume="latest")
    minutes = (time.time() - t0) / 60
    tax = Taxonomy.load(run / "taxonomy.json")
    few, common = _select_species(tax)
    species = [" > ".join(t.path) for t in few + common]
    target, tag = (run / a.checkpoint, "-" + a.checkpoint.strip("/").replace("/", "-")) if a.checkpoint \
        else (run, "")
    res = {"overrides": a.overrides, "world": world, "checkpoint": a.checkpoint,
           "train_minutes_this_call": round(minutes, 2), "n_per_species": a.n}
    for g in ("taxa", "cfg"):
        o = evaluate(target, metrics=["oracle"], levels=["species"], species=species, n_per_taxon=a.n,
                     guidance=g, out=run / "eval" / f"variant{tag}-{g}")["oracle"]["levels"]["species"]
        res[g] = {**o["accuracy"], "frechet": o["frechet"]}
        print(a.name, g, json.dumps(res[g]), flush=True)
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    if a.checkpoint:  # the log up to the scored checkpoint, not the run's end
        st = json.loads((target / "state.json").read_text())
        stages = list(dict.fromkeys(r["stage"] for r in recs))
        upto = stages[:stages.index(st["stage"])]
        recs = [r for r in recs if r["stage"] in upto or (r["stage"] == st["stage"] and r["step"] <= st["step"])]
    fixed = [r for r in recs if "fixed_loss" in r]
    # measured at stage starts and ends only: a mid-stage checkpoint has none of its own
    res["fixed_loss_end"] = fixed[-1]["fixed_loss"] if fixed and recs and fixed[-1] is recs[-1] else None
    gains = [r["level_gains"] for r in recs if "level_gains" in r]
    res["level_gains_end"] = gains[-1] if gains else None  # flat baselines have no levels
    (run / f"variant{tag}.json").write_text(json.dumps(res, indent=1))
    print(f"wrote {run / f'variant{tag}.json'}")


if __name__ == "__main__":
    main()
