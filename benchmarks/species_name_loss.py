"""Does a run's UNet use the species name, and at which noise level? (issue 8: the sibling grid)

    python benchmarks/species_name_loss.py --run <variants>/base3600-all-1080 [--genera 4] [--n 8]

On clean renders of the synthetic world's species (genera with at least 4 species, 4 of each, `--n`
images a species, one noise draw per image and timestep), the denoising loss (epsilon MSE) with the
species' own context (levels class ... species) against

- a sibling's context (the same genus, another epithet): how much the name alone lowers the loss;
- the genus prefix (levels class ... genus): what the species level adds over its parent;

as ratios loss(other) / loss(own), over the whole image and over the *mark pixels* only: those that
differ between a render and the same render with the sibling's mark (World.render_swap, same seed),
i.e. the own and the sibling's mark discs, about 2% of the image. A ratio of 1 means the name does not
matter there; a model that knows which mark a name means scores well above 1 on the mark pixels at the
noise levels where the mark is decided. Printed per timestep beside the min-SNR weight that
`train.snr_gamma` gives that timestep (how much training weight it gets).

What "knowing the mark" looks like: the run's tiny base (model.pretrained_unet), given its own trait
captions, against the same caption with another mark's words ("... white dot front top" -> "... black
dot rear bottom"), on 64 random trait combinations of its pretraining world, the same two ratios. (Upper
side: a changed word also changes the encoder's later positions, so part of the image ratio is that.)
Writes <out>/<run name>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TIMESTEPS = (50, 100, 200, 300, 400, 500, 600, 700, 850)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--genera", type=int, default=4, help="genera with >= 4 species, in vocabulary order")
    ap.add_argument("--n", type=int, default=8, help="images per species")
    ap.add_argument("--out", default="benchmarks/results/species_name_loss")
    a = ap.parse_args()
    import numpy as np
    import torch
    from diffusers import DDPMScheduler

    from taxadiffusion.backbone import min_snr_weight
    from taxadiffusion.datasets.synthetic import make_world
    from taxadiffusion.evaluation.run import _run_config, data_world
    from taxadiffusion.sampling import load_for_sampling
    from taxadiffusion.tinybase import pixels
    t0 = time.time()
    run_cfg = _run_config(Path(a.run))  # what run_world reads; here its train and model settings too
    world_cfg = data_world(run_cfg.data.root) if run_cfg is not None else None
    if world_cfg is None:
        raise SystemExit(f"{a.run} was not trained on the synthetic world (no world.json beside its data)")
    world = make_world(world_cfg)
    pipe, _ = load_for_sampling(a.run, device="cpu")
    if pipe.conditioner is None:
        raise SystemExit(f"{a.run} is a flat text baseline: it has no level contexts to compare")
    gamma, base = run_cfg.train.snr_gamma, run_cfg.model.pretrained_unet
    train_sched = DDPMScheduler.from_config(pipe.scheduler.config)  # the training schedule of the run
    unet = pipe.unet.eval()
    genera: dict[tuple, list[tuple]] = {}
    for lin in world.lineages:
        genera.setdefault(lin[:-1], []).append(lin)
    chosen = [(g, s[:4]) for g, s in genera.items() if len(s) >= 4][: a.genera]
    if not chosen:
        raise SystemExit(f"{a.run}: no genus with 4 species in its world")
    gen = torch.Generator().manual_seed(0)
    keys = ("sibling_all", "sibling_mark", "genus_all", "genus_mark")
    acc = {t: {k: [] for k in keys} for t in TIMESTEPS}

    with torch.no_grad():
        for g, species in chosen:
            ctx = {lin: pipe.context(lin) for lin in species}
            parent = pipe.context(g)
            for lin in species:
                x0 = pixels(world.render(lin, a.n, seed=7))
                others = [o for o in species if o != lin]
                masks = [(pixels(world.render_swap(lin, o, a.n, seed=7)) != x0).any(1, keepdim=True).float()
                         for o in others]
                union = torch.stack(masks).amax(0)
                for t in TIMESTEPS:
                    eps = torch.randn(x0.shape, generator=gen)
                    tt = torch.full((a.n,), t)
                    xt = train_sched.add_noise(x0, eps, tt)

                    def err(c: torch.Tensor) -> torch.Tensor:
                        return (unet(xt, tt, encoder_hidden_states=c[None].expand(a.n, -1, -1)).sample - eps) ** 2

                    def on(e: torch.Tensor, m: torch.Tensor) -> float:
                        m = m.expand_as(e)
                        return float((e * m).sum() / m.sum())

                    own = err(ctx[lin])
                    for o, m in zip(others, masks):
                        sib = err(ctx[o])
                        acc[t]["sibling_all"].append(float(sib.mean() / own.mean()))
                        acc[t]["sibling_mark"].append(on(sib, m) / on(own, m))
                    par = err(parent)
                    acc[t]["genus_all"].append(float(par.mean() / own.mean()))
                    acc[t]["genus_mark"].append(on(par, union) / on(own, union))
    words = base_words_reference(base, TIMESTEPS) if base else None
    weights = min_snr_weight(train_sched, torch.tensor(TIMESTEPS), gamma)
    rows = [{"t": t, "snr_weight": float(w), **{k: float(np.mean(v)) for k, v in acc[t].items()}}
            for t, w in zip(TIMESTEPS, weights)]
    name = Path(a.run).resolve().name
    res = {"run": str(a.run), "snr_gamma": gamma, "genera": [" ".join(g[-1:]) for g, _ in chosen],
           "species_per_genus": 4, "n": a.n, "rows": rows, "base": base,
           "base_words": words, "seconds": round(time.time() - t0, 1), "torch": torch.__version__}
    print(f"{a.run}: loss(other context) / loss(own context), {len(chosen)} genera x 4 species x {a.n} "
          f"images; min-SNR weight with gamma {gamma}")
    print("    t  weight  sibling: image  marks   genus prefix: image  marks")
    for r in rows:
        print(f"  {r['t']:3d}  {r['snr_weight']:.3f}   {r['sibling_all']:.4f}  {r['sibling_mark']:.4f}"
              f"          {r['genus_all']:.4f}  {r['genus_mark']:.4f}")
    if words:
        print(f"its base ({base}) given the mark in words: loss(other mark's words) / "
              "loss(own caption)")
        print("    t  image   marks")
        for r in words:
            print(f"  {r['t']:3d}  {r['image']:.4f}  {r['mark']:.4f}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    print(f"wrote {out / (name + '.json')} ({res['seconds']:.0f} s)")


def base_words_reference(base: str, timesteps, n: int = 64) -> list[dict]:
    """The tiny base told the mark in words: per timestep loss(another mark's words) / loss(own caption),
    image and mark pixels, on n random trait combinations of its pretraining world (tinybase.pretrain)."""
    import numpy as np
    import torch

    from taxadiffusion.datasets.synthetic import MARKS, render_options
    from taxadiffusion.tinybase import caption, open_base, pixels, pretraining_world, random_rows
    bb, cache = open_base(base)
    unet, sched = bb.unet.eval(), bb.noise_scheduler
    wc, hue0 = pretraining_world()
    rng = np.random.default_rng(5)
    rows = random_rows(rng, n)
    swap = rows.copy()
    swap[:, 4] = (rows[:, 4] + rng.integers(1, len(MARKS), n)) % len(MARKS)  # always another mark

    x0 = pixels(render_options(rows, wc, hue0, seed=99))
    mark = (pixels(render_options(swap, wc, hue0, seed=99)) != x0).any(1, keepdim=True).float().expand_as(x0)
    own, other = (cache.encode([caption(r, hue0) for r in rr]) for rr in (rows, swap))
    gen, out = torch.Generator().manual_seed(0), []
    with torch.no_grad():
        for t in timesteps:
            eps = torch.randn(x0.shape, generator=gen)
            tt = torch.full((n,), t)
            xt = sched.add_noise(x0, eps, tt)
            e_own, e_other = ((unet(xt, tt, encoder_hidden_states=c).sample - eps) ** 2 for c in (own, other))
            out.append({"t": t, "image": float(e_other.mean() / e_own.mean()),
                        "mark": float((e_other * mark).sum() / (e_own * mark).sum())})
    return out


if __name__ == "__main__":
    main()
