"""`taxadiffusion sample`: load a run, checkpoint or saved pipeline; write PNGs named by seed and grids.

Defaults come from the run's config (sample section) and can be overridden per call; a saved
pipeline folder without a run config uses the paper's defaults (SampleConfig).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .config import SampleConfig, from_dict
from .imaging import labelled_grid, save_pngs


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_for_sampling(run: str | Path, scheduler: str | None = None, device: str | None = None):
    """(pipeline on its device, SampleConfig of the run or the paper's defaults)."""
    from .checkpoint import resolve_checkpoint
    from .pipeline import PIPELINE_FILE, TaxaDiffusionPipeline
    run = Path(run)
    if (run / PIPELINE_FILE).exists():
        sc = SampleConfig()
        pipe = TaxaDiffusionPipeline.from_pretrained(run, scheduler=scheduler or sc.scheduler)
    else:
        ckpt = resolve_checkpoint(run)
        sc = from_dict(json.loads((ckpt / "config.json").read_text())).sample
        pipe = TaxaDiffusionPipeline.from_checkpoint(ckpt, scheduler=scheduler or sc.scheduler)
    return pipe.to(pick_device(device)), sc


def sample_command(a) -> list[Path]:
    pipe, sc = load_for_sampling(a.run, a.scheduler, a.device)
    guidance = a.guidance or sc.guidance
    scale = sc.scale if a.scale is None else a.scale
    steps = a.steps or sc.steps
    interval = (tuple(float(x) for x in a.guidance_interval.split(","))
                if a.guidance_interval else (sc.guidance_start, sc.guidance_stop))
    guide = sc.guide_level if a.guide_level is None else a.guide_level
    level = int(a.level) if a.level is not None and a.level.isdigit() else a.level
    names = pipe.resolve_taxon(a.taxon, level)
    tax = pipe.taxonomy
    unseen = len(names) - pipe.known_depth(names)
    if unseen:
        print(f"note: the last {unseen} name(s) of {' > '.join(names)} are not in the training "
              f"taxonomy; they are conditioned through their own prompts and level encoders")
    out = Path(a.out) if a.out else Path(a.run) / "samples" / slug(" ".join(names[-2:]))
    kw = dict(guidance=guidance, guidance_scale=scale, guide_level=guide, guidance_interval=interval,
              num_inference_steps=steps, seed=a.seed, output_type="uint8",
              batch_size=a.batch_size or sc.batch_size)
    lineage = " > ".join(names)
    if a.all_levels:
        rows, labels = [], []
        for lvl in range(len(names)):
            imgs = pipe(lineage, level=lvl, num_images=a.n, **kw).images
            rows.append(imgs)
            labels.append(f"{tax.ranks[lvl]}: {names[lvl]}")
            save_pngs(imgs, [f"level{lvl}-seed{a.seed}-{i:04d}" for i in range(a.n)], out)
        grid = out / f"levels-seed{a.seed}.png"
        labelled_grid(rows, labels, [f"#{i}" for i in range(a.n)]).save(grid)
    else:
        imgs = pipe(lineage, num_images=a.n, **kw).images
        files = save_pngs(imgs, [f"seed{a.seed}-{i:04d}" for i in range(a.n)], out)
        grid = out / f"grid-seed{a.seed}.png"
        ncol = min(8, a.n)
        rows = [imgs[i:i + ncol] for i in range(0, a.n, ncol)]
        labelled_grid(rows, [], [], cell=max(96, imgs.shape[-1])).save(grid)
    (out / "settings.json").write_text(json.dumps(
        {"run": str(a.run), "taxon": lineage, "n": a.n, "scheduler": type(pipe.scheduler).__name__,
         "all_levels": a.all_levels, **{k: v for k, v in kw.items() if k != "output_type"}}, indent=1))
    print(f"wrote {a.n * (len(names) if a.all_levels else 1)} images and {grid}")
    return [grid]
