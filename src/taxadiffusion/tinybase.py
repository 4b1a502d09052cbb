"""A pretrained tiny base for the synthetic world: what Stable Diffusion v1.5 is to the paper.

TaxaDiffusion adapts a UNet that already turns text into images (paper Sec. 3.1): SD knows "a red fish
with a black spot" but not "Chaetodon auriga". A UNet trained from scratch in stage 0 on one class
name never learns to read its context, so the frozen UNet of later stages cannot use them
(measured: docs/notes in the README). This module gives the tiny CPU model the same starting point:
a text-to-image UNet pretrained on *trait captions in words* ("an egg fish, long body, forked tail,
orange, dark bands, a white dot front top"), drawn from random trait combinations of the
synthetic renderer, through the same frozen tiny CLIP text encoder. Taxon names never appear in
pretraining; learning which name means which traits is left to the method, as in the paper.

    python -m taxadiffusion.tinybase --steps 3500 --out src/taxadiffusion/assets/tiny-base  # 62 min

A base can be trained further (`--init`, the chain is kept in recipe.json); how well a base reads its
captions is measured by benchmarks/base_text_following.py, e.g. for 2,400 more min-SNR steps (37 min):

    python -m taxadiffusion.tinybase --init src/taxadiffusion/assets/tiny-base --steps 2400 \
        --seed 1235 --ema-decay 0.999 --snr-gamma 5 --out runs/tiny-base-2

The result ships with the package (assets/tiny-base: UNet safetensors + JSON recipe, ~7 MB) and is
loaded by `model.pretrained_unet: builtin` (backbone.load_tiny_base). A second one ships for the
trait-discovery figure (`builtin-3600`, assets/tiny-base-3600): that base trained 3 x 1,200 steps
further, each step of the chain `--init <previous> --steps 1200 --ema-decay 0.999 --snr-gamma 5` with
seeds 1235, 1236, 1237 (31 min each at one thread; its recipe.json records the chain; the last link's
"mark_weight": 0.0 is an option of the time, since removed, that was off). The demo stays on `builtin`.
The tiny text encoder is not shipped: it is rebuilt from its seed and checked against the fingerprint
recorded at pretraining.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .backbone import ASSET, TINY_KEYS, base_dir, build_tiny, min_snr_weight, module_fingerprint
from .conditioning import TextEmbeddingCache
from .config import ModelConfig, load_config
from .datasets.synthetic import BODIES, GENERA, MARKS, ORDERS, WorldConfig, render_options, trait_values

HUES = ("red", "orange", "yellow", "lime", "green", "teal", "cyan", "azure", "blue", "violet",
        "magenta", "pink")
ASPECT = {1.3: "short", 1.6: "medium", 1.9: "long"}


def pretraining_world() -> tuple[WorldConfig, float]:
    """(world config, hue0) of pretraining: another world than the demo's (seed 0), so other trait
    combinations; hue0 fixes its hue words whatever the run's seed."""
    wc = WorldConfig(seed=1234)
    return wc, float(np.random.default_rng(wc.seed).random())


def pixels(imgs: np.ndarray) -> torch.Tensor:
    """uint8 renders (N, H, W, 3) -> (N, 3, H, W) in [-1, 1], the pixel-space UNet's input."""
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1


def open_base(name: str):
    """(tiny backbone with the base `name` loaded, text-embedding cache): built with the base's own
    model settings from its recipe (e.g. a base made with another text encoder init), checked as any
    base is (backbone.load_tiny_base)."""
    recipe = json.loads((base_dir(name) / "recipe.json").read_text())
    mc = dataclasses.replace(load_config("demo").model, pretrained_unet=name,
                             **{k: v for k, v in recipe["model"].items() if k in TINY_KEYS})
    bb = build_tiny(mc, pretraining_world()[0].image_size)
    return bb, TextEmbeddingCache(bb.text_encoder, bb.tokenizer, module_fingerprint(bb.text_encoder))


def caption(row: np.ndarray, hue0: float) -> str:
    """Trait words for one row of trait options (body, order, family, genus, species)."""
    t = trait_values(row, hue0)
    hue = HUES[int(round(t["family"]["hue"] * len(HUES))) % len(HUES)]
    g = t["genus"]
    pattern = "plain" if g["pattern"] == "plain" else f"{g['tone']} {g['pattern']}"
    s = t["species"]
    return (f"{t['class']['body']} fish, {ASPECT[t['order']['aspect']]} body, {t['order']['tail']} tail, "
            f"{hue}, {pattern}, {s['mark_colour']} dot {s['mark_position'].replace('-', ' ')}")


def random_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random trait combinations over the renderer's whole vocabulary (families: 64 hues)."""
    return np.stack([rng.integers(0, len(BODIES), n), rng.integers(0, len(ORDERS), n),
                     rng.integers(0, 64, n), rng.integers(0, len(GENERA), n),
                     rng.integers(0, len(MARKS), n)], 1)


def pretrain(model_cfg: ModelConfig, steps: int, out: Path, batch_size: int = 32, lr: float = 1e-3,
             seed: int = 1234, p_uncond: float = 0.1, ema_decay: float = 0.9995,
             snr_gamma: float | None = None, init: Path | None = None) -> Path:
    """Text-to-image pretraining of the tiny UNet on trait captions; writes out/ (safetensors + JSON).

    `init`: continue from an earlier base (its folder); its recipe is kept under "init" in the new one,
    so the chain of runs that made a base is on record. `snr_gamma`: min-SNR loss weighting (Hang et
    al. 2023, diffusers' --snr_gamma), which moves weight from nearly clean steps, where the caption
    hardly matters, to the noisy ones where colour and body plan are decided.
    """
    from diffusers.training_utils import EMAModel
    from safetensors.torch import save_file
    # random init, or `init` loaded and checked against this config as any base is (load_tiny_base)
    model_cfg = dataclasses.replace(model_cfg, pretrained_unet=None if init is None else str(init))
    torch.manual_seed(seed)
    wc, hue0 = pretraining_world()
    bb = build_tiny(model_cfg, wc.image_size, seed=0)
    unet, sched = bb.unet.train(), bb.noise_scheduler
    parent = None if init is None else json.loads((Path(init) / "recipe.json").read_text())
    cache = TextEmbeddingCache(bb.text_encoder, bb.tokenizer, module_fingerprint(bb.text_encoder))
    null = cache.encode([""])[0]
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200))
    ema = EMAModel(unet.parameters(), decay=ema_decay, use_ema_warmup=True, power=3 / 4)
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    rng.random()  # a discarded draw: keeps seed 1234's data order that of the first shipped base
    bar, losses, t0 = tqdm(range(steps), desc="pretraining tiny base"), [], time.time()
    for step in bar:
        rows = random_rows(rng, batch_size)
        imgs = render_options(rows, wc, hue0, seed=(seed, step))
        x0 = pixels(imgs)
        caps = [caption(r, hue0) for r in rows]
        ctx = cache.encode(caps)
        drop = torch.rand(batch_size, generator=g) < p_uncond  # CFG's null branch, as SD was trained
        ctx[drop] = null
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=g)
        loss = F.mse_loss(unet(sched.add_noise(x0, noise, t), t, ctx).sample, noise, reduction="none")
        loss = (loss.mean(dim=(1, 2, 3)) * min_snr_weight(sched, t, snr_gamma)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        warm.step()
        opt.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if len(cache.memory) > 20_000:  # captions are nearly unique: keep the memory cache bounded
            cache.memory.clear()
    ema.copy_to(unet.parameters())
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, out / "unet.safetensors")
    recipe = {"model": {k: getattr(model_cfg, k) for k in TINY_KEYS}, "steps": steps,
              "batch_size": batch_size, "lr": lr, "seed": seed, "p_uncond": p_uncond,
              "ema_decay": ema_decay, "world_seed": wc.seed, "snr_gamma": snr_gamma,
              "text_encoder_fingerprint": module_fingerprint(bb.text_encoder),
              "final_loss_mean_last_200": float(np.mean(losses[-200:])),
              "minutes": round((time.time() - t0) / 60, 1), "torch": torch.__version__,
              "caption_example": caption(random_rows(np.random.default_rng(0), 1)[0], hue0),
              "init": parent}
    (out / "recipe.json").write_text(json.dumps(recipe, indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="pretrain the tiny base on synthetic trait captions")
    ap.add_argument("--config", default="demo", help="preset whose model section defines the UNet")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--out", default=str(ASSET))
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=1234, help="data order and noise (the world is fixed)")
    ap.add_argument("--ema-decay", type=float, default=0.9995)
    ap.add_argument("--snr-gamma", type=float, default=None, help="min-SNR weighting, e.g. 5")
    ap.add_argument("--init", default=None, help="continue from this base folder (e.g. the shipped one)")
    a = ap.parse_args()
    print(pretrain(load_config(a.config).model, a.steps, Path(a.out), lr=a.lr, seed=a.seed,
                   ema_decay=a.ema_decay, snr_gamma=a.snr_gamma, init=Path(a.init) if a.init else None))


if __name__ == "__main__":
    main()
