"""Does a tiny base read its text? Caption following of a pretrained tiny base (tinybase.py).

    python benchmarks/base_text_following.py [--base builtin] [--base /path/to/other/base] [--n 64]

TaxaDiffusion's later stages train only a level module in front of a frozen UNet (paper Sec. 3.3), so
they can only work if the base UNet already turns text into traits, as SD v1.5 does. This measures it
on the base's own pretraining task (trait captions of the world it was pretrained on, world seed 1234):
- hue error: samples for n random captions (CFG, DDIM) against renders of the same trait rows; the
  error is the mean angle (degrees) between the circular mean hue of their saturated pixels. Two
  renders of the same rows with other poses give the floor; the same samples against a shuffled
  caption order give the level of a base that ignores its text (about 90).
- loss ratio: epsilon MSE with a shuffled caption over the MSE with the right caption on real renders
  at several timesteps (1.0 = the caption is not used).
- caption ceiling: the demo world's 16 evaluated species (demo._select_species), each sampled from its
  *trait caption* and scored by the oracle per rank. This is what the progressive model could reach if
  its level modules turned taxon names into exactly the trait words the base knows.
Writes benchmarks/results/base_text_following.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

RANKS = ("class", "order", "family", "genus", "species")


def hue_angles(images: np.ndarray) -> np.ndarray:
    """Circular mean hue (radians) of the saturated, not dark pixels of each uint8 (N, H, W, 3) image;
    NaN where fewer than 5 pixels qualify. Backgrounds of the world are muted (saturation <= 0.2)."""
    x = images.astype(np.float32) / 255
    mx, mn = x.max(-1), x.min(-1)
    sat = (mx - mn) / (mx + 1e-6)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    hue = np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)
    keep = (sat > 0.45) & (mx > 0.25)
    out = np.full(len(x), np.nan)
    for i in range(len(x)):
        h = hue[i][keep[i]]
        if h.size >= 5:
            out[i] = np.angle(np.exp(1j * h).mean())
    return out


def hue_error(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute circular difference in degrees, ignoring NaN."""
    return float(np.nanmean(np.abs(np.angle(np.exp(1j * (a - b))))) / np.pi * 180)


@torch.no_grad()
def sample_cfg(bb, ctx: torch.Tensor, null: torch.Tensor, scale: float, steps: int) -> np.ndarray:
    """DDIM samples of the pixel-space tiny UNet for raw contexts with CFG; uint8 (N, 32, 32, 3)."""
    from diffusers import DDIMScheduler
    from taxadiffusion.guidance import cfg
    sched = DDIMScheduler.from_config(bb.noise_scheduler.config)
    sched.set_timesteps(steps)
    x = torch.randn(len(ctx), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps:
        e_c, e_u = bb.unet(torch.cat([x, x]), t, torch.cat([ctx, null])).sample.chunk(2)
        x = sched.step(cfg(e_u, e_c, scale), t, x).prev_sample
    return ((x.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)


@torch.no_grad()
def measure(base: str, n: int, scales: list[float], steps: int, seed: int = 11) -> dict:
    from taxadiffusion.datasets.synthetic import render_options
    from taxadiffusion.tinybase import caption, open_base, pixels, pretraining_world, random_rows
    bb, cache = open_base(base)  # with the base's own model settings (its recipe)
    unet = bb.unet.eval()
    wc, hue0 = pretraining_world()
    rows = random_rows(np.random.default_rng(seed), n)
    ctx = cache.encode([caption(r, hue0) for r in rows])
    null = cache.encode([""]).expand(n, -1, -1)
    target = hue_angles(render_options(rows, wc, hue0, seed=(seed, 1)))
    res = {"base": base, "n": n, "steps": steps,
           "floor_render_vs_render": hue_error(hue_angles(render_options(rows, wc, hue0, seed=(seed, 2))),
                                               target)}
    # loss ratio on real renders, one noise draw per timestep
    x0 = pixels(render_options(rows, wc, hue0, seed=(seed, 3)))
    res["loss_ratio_shuffled_over_right"] = {}
    for t in (300, 600, 850):
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
        tt = torch.full((n,), t)
        xt = bb.noise_scheduler.add_noise(x0, noise, tt)
        right = F.mse_loss(unet(xt, tt, ctx).sample, noise).item()
        wrong = F.mse_loss(unet(xt, tt, ctx.roll(1, 0)).sample, noise).item()
        res["loss_ratio_shuffled_over_right"][t] = wrong / right
    res["hue_error"], res["hue_error_shuffled"], res["seconds"] = {}, {}, {}
    for s in scales:
        t0 = time.perf_counter()
        h = hue_angles(sample_cfg(bb, ctx, null, s, steps))
        res["hue_error"][s] = hue_error(h, target)
        res["hue_error_shuffled"][s] = hue_error(np.roll(h, 1), target)
        res["seconds"][s] = time.perf_counter() - t0
    res["caption_ceiling"] = caption_ceiling(bb, cache, scales[len(scales) // 2], steps)
    return res


@torch.no_grad()
def caption_ceiling(bb, cache, scale: float, steps: int, n: int = 8) -> dict:
    """Oracle accuracy per rank of samples drawn from the trait captions of the demo's species."""
    from taxadiffusion.datasets.synthetic import WorldConfig, make_world
    from taxadiffusion.demo import _select_species
    from taxadiffusion.evaluation.oracle import load_or_train_oracle
    from taxadiffusion.tinybase import caption
    world = make_world(WorldConfig())
    oracle = load_or_train_oracle(WorldConfig())
    few, common = _select_species(world.taxonomy)
    ids = [world.species_id(t) for t in few + common for _ in range(n)]
    ctx = cache.encode([caption(world.options[i], world.hue0) for i in ids])
    img = sample_cfg(bb, ctx, cache.encode([""]).expand(len(ids), -1, -1), scale, steps)
    return {"scale": scale, "n_per_species": n, **oracle.score(img, [world.lineages[i] for i in ids])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", action="append", help="a shipped base's name (tinybase.BUILTIN: builtin, "
                    "builtin-3600) or a folder; repeat to compare")
    ap.add_argument("--n", type=int, default=64, help="captions (one sample each)")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0, 6.0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/base_text_following")
    a = ap.parse_args()
    results = []
    for base in a.base or ["builtin"]:
        r = measure(base, a.n, a.scales, a.steps)
        print(json.dumps(r), flush=True)
        results.append(r)
    md = ["| base | " + " | ".join(f"hue error, CFG {s:g}" for s in a.scales)
          + " | shuffled captions | render vs render | loss ratio t=300 / 600 / 850 "
          "| caption ceiling: class / order / family / genus / species acc |",
          "|---" * (len(a.scales) + 5) + "|"]
    for r in results:
        lr = r["loss_ratio_shuffled_over_right"]
        md.append(f"| {r['base']} | " + " | ".join(f"{r['hue_error'][s]:.1f}" for s in a.scales)
                  + f" | {np.mean(list(r['hue_error_shuffled'].values())):.1f} | "
                  f"{r['floor_render_vs_render']:.1f} | " + " / ".join(f"{v:.3f}" for v in lr.values()) + " | "
                  + " / ".join(f"{r['caption_ceiling'][k]:.3f}" for k in RANKS) + " |")
    print("\n".join(md))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps({"results": results}, indent=1))
    Path(a.out + ".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
