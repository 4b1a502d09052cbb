"""Training throughput: our step against the released code's step, same model, same batch, one run.

    python benchmarks/train_throughput.py [--data ../shared/data/cub-birds] [--steps 30] [--skip-sd]

For each configuration (the tiny CPU model; SD v1.5's architecture at random init, small batch):
- ours: `taxadiffusion.training.train` itself, run for N steps of a stage; we read the median step
  time it logs (metrics.jsonl, step_s_median), after a warm-up window.
- reference: what the released code does every step (REFERENCE-FACTS.md): decode and preprocess the
  batch's images from disk, (SD: encode them with the VAE), run the frozen text encoder on every level
  prompt of every sample, fp32, then the same conditioner, UNet forward/backward and AdamW step.
- floor: UNet forward + backward alone on the same batch with a fixed context: no method can be
  faster than this, so floor / ours is our distance from it.
Medians over N steps. Writes benchmarks/results/train_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from taxadiffusion.backbone import add_lora, build_backbone  # noqa: E402
from taxadiffusion.conditioning import TaxonomyConditioner  # noqa: E402
from taxadiffusion.config import load_config  # noqa: E402
from taxadiffusion.datasets import read_table  # noqa: E402
from taxadiffusion.datasets.images import SpeciesImageDataset  # noqa: E402
from taxadiffusion.stages import apply_stage, plan_stages  # noqa: E402
from taxadiffusion.training import train  # noqa: E402


def median_time(fn, n: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def ours(cfg, stage: int, steps: int, out: Path) -> float:
    """Median step time of our loop: run stage `stage` (after a 1-step stage 0 when stage > 0)."""
    ov = [f"train.output_dir={out}", f"name=ours-s{stage}", "train.checkpoint_every=0",
          "train.validate_every=0", "train.validation_seeds=0", "train.fixed_batch=0",
          f"train.log_every={steps}", f"train.steps_stage0={steps if stage == 0 else 1}",
          f"train.steps_per_stage={steps}", f"train.stages={'0' if stage == 0 else f'0,{stage}'}"]
    from taxadiffusion.config import apply_overrides, from_dict
    c = from_dict(apply_overrides(cfg.to_dict(), ov))
    run = train(c)
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    name = plan_stages(c.train, tuple(c.data.ranks))[stage].name
    (rec,) = [r for r in recs if r.get("stage") == name and "step_s_median" in r]
    return rec["step_s_median"]


def reference_and_floor(cfg, stage: int, steps: int) -> tuple[float, float]:
    """The released code's step, and the UNet-only floor, on the same modules and batch size."""
    table = read_table(cfg.data.format, cfg.data.metadata, cfg.data.root, ranks=cfg.data.ranks)
    tax = table.taxonomy()
    ds = SpeciesImageDataset(table, tax, cfg.data.resolution, train=True)
    bb = build_backbone(cfg.model, cfg.data.resolution)
    plan = plan_stages(cfg.train, tax.ranks)
    if any(s.train_lora for s in plan):
        add_lora(bb.unet, cfg.model)
    L = tax.num_levels
    cond = TaxonomyConditioner(L, bb.context_dim, cfg.model.level_layers, cfg.model.level_heads,
                               cfg.model.level_ff, cfg.model.level_dropout)
    params = apply_stage(plan[stage], bb.unet, cond)
    opt = torch.optim.AdamW(params, lr=1e-5)
    B, k = cfg.train.batch_size, plan[stage].level
    g = torch.Generator().manual_seed(0)
    T = bb.noise_scheduler.config.num_train_timesteps
    pos = {"i": 0}

    def batch_indices():
        idx = [(pos["i"] + j) % len(ds) for j in range(B)]
        pos["i"] += B
        return idx

    def model_input(idx):
        x = torch.stack([ds[i]["pixels"] for i in idx])  # decoded from disk every step
        if bb.vae is not None:
            with torch.no_grad():
                x = bb.vae.encode(x).latent_dist.sample() * bb.vae.config.scaling_factor
        return x

    def unet_update(x, ctx):
        noise = torch.randn(x.shape, generator=g)
        t = torch.randint(0, T, (len(x),), generator=g)
        eps = bb.unet(bb.noise_scheduler.add_noise(x, noise, t), t, ctx).sample
        F.mse_loss(eps, noise).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def reference():
        idx = batch_indices()
        x = model_input(idx)
        prompts = [tax.prompts(tax.ancestors(tax.make(table.records[i].lineage))[k]) for i in idx]
        # the text encoder on every level prompt of every sample (no cache), fp32
        ids = bb.tokenizer([p for ps in prompts for p in ps], padding="max_length", max_length=77,
                           truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            emb = bb.text_encoder(ids)[0].view(B, k + 1, 77, -1)
        keep = torch.ones(B, k + 1, dtype=torch.bool)
        ctx = cond(emb, keep, emb[0, 0])
        unet_update(x, ctx)

    x_fixed = model_input(batch_indices())
    ctx_fixed = torch.randn(B, 77, bb.context_dim)

    def floor():  # UNet forward + backward on a fixed batch and context
        noise = torch.randn(x_fixed.shape, generator=g)
        t = torch.randint(0, T, (B,), generator=g)
        c = ctx_fixed.requires_grad_(plan[stage].train_levels != ())
        eps = bb.unet(bb.noise_scheduler.add_noise(x_fixed, noise, t), t, c).sample
        F.mse_loss(eps, noise).backward()
        bb.unet.zero_grad(set_to_none=True)

    return median_time(reference, steps), median_time(floor, steps)


def run_config(name: str, cfg, stages: list[int], steps: int, out: Path) -> list[dict]:
    rows = []
    for st in stages:
        o = ours(cfg, st, steps, out / ("sd15" if "sd15" in name else "tiny"))
        ref, fl = reference_and_floor(cfg, st, max(3, steps // 3) if "sd15" in name else steps)
        B = cfg.train.batch_size
        rows.append({"config": name, "stage": st, "batch": B, "ours_step_s": o, "reference_step_s": ref,
                     "unet_floor_step_s": fl, "ours_img_s": B / o, "reference_img_s": B / ref,
                     "speedup": ref / o, "floor_share_of_ours": fl / o})
        print(json.dumps(rows[-1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="generic-CSV image folder (default: a synthetic world)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sd-steps", type=int, default=4)
    ap.add_argument("--skip-sd", action="store_true")
    ap.add_argument("--skip-tiny", action="store_true", help="keep the tiny rows already in --out")
    ap.add_argument("--out", default="benchmarks/results/train_throughput.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="tdbench-"))
    os.environ.setdefault("TAXADIFFUSION_CACHE", str(tmp / "cache"))
    data = a.data
    if data is None:
        from taxadiffusion.datasets.synthetic import write_dataset
        data = str(write_dataset(tmp / "world").parent)
    tiny = load_config("tiny-cpu", [f"data.root={data}"])
    if a.skip_tiny:
        rows = [r for r in json.loads(Path(a.out).read_text())["rows"] if "sd15" not in r["config"]]
    else:
        rows = run_config("tiny-cpu (1.7M UNet, 32 px, batch 32)", tiny, [0, 1], a.steps, tmp / "runs")
    if not a.skip_sd:
        sd = load_config("tiny-cpu", [f"data.root={data}", "model.base=sd15-random",
                                      "model.level_heads=8", "model.level_ff=2048",
                                      "model.beta_schedule=scaled_linear", "data.resolution=256",
                                      "train.batch_size=2", "train.train_unet_stage0=false",
                                      "data.cache_latents=false", "data.num_workers=0",
                                      "train.ema_decay=0"])
        rows += run_config("sd15-shaped (860M UNet, 256 px, batch 2)", sd, [1], a.sd_steps, tmp / "runs")
    info = {"machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "platform": platform.platform(), "python": sys.version.split()[0],
                        "torch": torch.__version__},
            "steps": a.steps, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(info, indent=1))
    print(f"\n{'config':45s} {'stage':>5s} {'ours img/s':>11s} {'ref img/s':>10s} {'speedup':>8s} {'floor/ours':>10s}")
    for r in rows:
        print(f"{r['config']:45s} {r['stage']:5d} {r['ours_img_s']:11.2f} {r['reference_img_s']:10.2f} "
              f"{r['speedup']:8.2f} {r['floor_share_of_ours']:10.2f}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
