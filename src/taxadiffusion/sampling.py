"""`taxadiffusion sample`: load a run, checkpoint or saved pipeline; write PNGs named by seed and grids.

Defaults come from the run's config (sample section), or those a saved pipeline carries, and can be
overridden per call.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .config import config_from_file
from .imaging import labelled_grid, save_pngs


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_for_sampling(run: str | Path, scheduler: str | None = None, device: str | None = None,
                      pretrained: str | None = None, pretrained_option: str | None = None):
    """(pipeline on its device, the SampleConfig of the run or of the saved pipeline).

    `pretrained`: the Stable Diffusion v1.5 folder (or hub id) an SD-based run loads its frozen base
    from, instead of its config's model.pretrained (the folder moved, or another machine).
    `pretrained_option`: how the running command lets the user give it ("--pretrained" for sample and
    evaluate), named in the error when the SD base is missing; None: commands without such an option,
    whose error says to edit the checkpoint's config.json instead."""
    from .checkpoint import resolve_checkpoint
    from .pipeline import PIPELINE_FILE, TaxaDiffusionPipeline
    run = Path(run)
    if (run / PIPELINE_FILE).exists():
        if pretrained:
            raise ValueError(f"{pretrained_option or 'pretrained'}: {run} is a saved pipeline, which "
                             f"carries every part it needs; it applies to runs and checkpoints only")
        pipe = TaxaDiffusionPipeline.from_pretrained(run, scheduler=scheduler)
        return pipe.to(pick_device(device)), pipe.sample_config  # the sampler and defaults it saved
    ckpt = resolve_checkpoint(run)
    cfg = config_from_file(ckpt / "config.json")
    sc = cfg.sample
    if cfg.model.base != "sd15":
        if pretrained:
            raise ValueError(f"{pretrained_option or 'pretrained'}: {run} was trained on the "
                             f"{cfg.model.base!r} backbone, whose checkpoint carries every part; only "
                             f"runs on Stable Diffusion v1.5 (model.base: sd15) load a base folder")
    else:
        _check_sd_base(run, ckpt, cfg.model.pretrained, pretrained, pretrained_option)
    pipe = TaxaDiffusionPipeline.from_checkpoint(ckpt, scheduler=scheduler or sc.scheduler,
                                                 pretrained=pretrained)
    return pipe.to(pick_device(device)), sc


def _check_sd_base(run: Path, ckpt: Path, configured: str, pretrained: str | None,
                   option: str | None) -> None:
    """Find the SD v1.5 base before loading, so a moved folder fails with what this command accepts
    (backbone.resolve_sd15's own message names train's model.pretrained= override)."""
    from .backbone import resolve_sd15
    src = pretrained or configured
    try:
        resolve_sd15(src)
    except FileNotFoundError as e:
        if Path(src).expanduser().is_dir():
            raise  # the folder is there but lacks files: that message lists them
        from huggingface_hub import constants
        where = (f"{option} {src!r}" if pretrained else
                 f"{src!r}, the model.pretrained of {ckpt / 'config.json'}")
        fix = (f"Pass the folder with `{option} /path/to/stable-diffusion-v1-5`" if option else
               f"Set model.pretrained in {ckpt / 'config.json'} to the folder")
        hub_id = src if re.fullmatch(r"[\w.-]+/[\w.-]+", src) else "stable-diffusion-v1-5/stable-diffusion-v1-5"
        raise FileNotFoundError(
            f"{run} was trained on Stable Diffusion v1.5, whose weights it loads from {where}: that is "
            f"not a local folder and not in the hub cache {constants.HF_HUB_CACHE}. Nothing is "
            f"downloaded at run time. {fix} (a diffusers folder with unet/, vae/, text_encoder/, "
            f"tokenizer/ and scheduler/), or a hub id already in the hub cache (on a machine with "
            f"internet `huggingface-cli download {hub_id}` fills it).") from e


def sample_command(a) -> list[Path]:
    pipe, sc = load_for_sampling(a.run, a.scheduler, a.device, pretrained=a.pretrained,
                                 pretrained_option="--pretrained")
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
        save_pngs(imgs, [f"seed{a.seed}-{i:04d}" for i in range(a.n)], out)
        grid = out / f"grid-seed{a.seed}.png"
        ncol = min(8, a.n)
        rows = [imgs[i:i + ncol] for i in range(0, a.n, ncol)]
        labelled_grid(rows, [], [], cell=max(96, imgs.shape[-1])).save(grid)
    (out / "settings.json").write_text(json.dumps(
        {"run": str(a.run), "taxon": lineage, "n": a.n, "scheduler": type(pipe.scheduler).__name__,
         "all_levels": a.all_levels, **{k: v for k, v in kw.items() if k != "output_type"}}, indent=1))
    print(f"wrote {a.n * (len(names) if a.all_levels else 1)} images and {grid}")
    return [grid]
