"""`taxadiffusion export`: a run as a hub-ready folder (the saved-pipeline layout of pipeline_io.py)
plus what a reader of the hub page needs.

`export_run(RUN, OUT)` writes the pipeline (pipeline_io.write_pipeline) and README.md (model card with
the hub's YAML header), training_config.json, samples/trait-grid.png, eval/<tag>/metrics.json +
metrics.md (the run's evaluations, if any); `push_folder` uploads it.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Sequence

from .pipeline import TaxaDiffusionPipeline
from .pipeline_io import LORA_FILE, PIPELINE_FILE, SHIM_FILE

CARD_TAGS = ["diffusers", "text-to-image", "taxonomy", "taxadiffusion", "biology"]
SD15_LICENSE = "creativeml-openrail-m"  # SD v1.5's weights are part of the export
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


# -- a run as an export ----------------------------------------------------------------------------------
def export_run(run: str | Path, out: str | Path, *, scheduler: str | None = None,
               push_to_hub: str | None = None, private: bool = False,
               base_model: str | None = None, datasets: Sequence[str] = (),
               license: str | None = None, sample_steps: int = 20, sample_images: int = 4,
               sample_seed: int = 0, overwrite: bool = False, device: str | None = None,
               pretrained: str | None = None) -> Path:
    """Write the run's latest checkpoint (or the checkpoint `run`) to `out` as described above.

    `scheduler`: the sampler saved (default: the run's sample.scheduler). `base_model`, `datasets`,
    `license`: the card's header (defaults: the SD base's hub id when the config names one, none,
    SD v1.5's licence for an SD-based run, else MIT). The trait grid is a quick preview with the
    exported pipeline: `sample_images` seeds x every rank of the most common species,
    `sample_steps` steps. `push_to_hub`: a hub repo id to upload the folder to (push_folder).
    `pretrained`: where an SD-based run's base is now, if it moved (its weights are exported too).
    """
    from .checkpoint import resolve_checkpoint
    from .config import config_from_file
    ckpt = resolve_checkpoint(Path(run))
    cfg = config_from_file(ckpt / "config.json")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} is not empty; choose a new folder or pass --overwrite")
        if not (out / PIPELINE_FILE).exists():
            raise ValueError(f"{out} holds no {PIPELINE_FILE}: not an export, so not replaced")
        shutil.rmtree(out)
    pipe = TaxaDiffusionPipeline.from_checkpoint(ckpt, scheduler=scheduler, pretrained=pretrained)
    pipe.save_pretrained(out)
    del pipe  # at SD size, two pipelines at once would double the memory
    (out / "training_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    metrics = copy_metrics(ckpt, out)
    from .sampling import pick_device
    exported = TaxaDiffusionPipeline.from_pretrained(out).to(pick_device(device))
    exported.set_progress_bar_config(disable=True)
    grid = trait_grid_png(exported, out / "samples" / "trait-grid.png", sample_images,
                          sample_steps, sample_seed)
    (out / "README.md").write_text(model_card(
        cfg, exported, repo_id=push_to_hub or str(out), base_model=base_model, datasets=datasets,
        license=license, metrics=metrics, grid=grid))
    if push_to_hub:
        push_folder(out, push_to_hub, private=private)
    return out


def copy_metrics(ckpt: Path, out: Path) -> list[tuple[str, str]]:
    """The run's eval/<tag>/metrics.json (+ metrics.md) into out/eval/<tag>/; (tag, markdown)."""
    run = ckpt.parents[2] if ckpt.parent.parent.name == "checkpoints" else ckpt
    found = []
    for js in sorted(run.glob("eval/*/metrics.json")):
        dest = out / "eval" / js.parent.name
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(js, dest / js.name)
        md = js.with_name("metrics.md")
        if md.exists():
            shutil.copy2(md, dest / md.name)
        found.append((js.parent.name, md.read_text() if md.exists() else ""))
    return found


def trait_grid_png(pipe: TaxaDiffusionPipeline, path: Path, n: int, steps: int, seed: int) -> dict:
    """One row per rank for the species with the most training images, the same seeds in every row
    (as training's validation grid); TaxaGuide's reference is the parent where the configured level
    is not above the row (analysis.traits.column_guide_level). Returns what the card says of it."""
    from .imaging import labelled_grid
    tax, sc = pipe.taxonomy, pipe.sample_config
    sp = max(tax.species, key=lambda t: (tax.count(t), t.path))
    lineage = " > ".join(sp.path)
    rows = [pipe(lineage, level=lvl, num_images_per_prompt=n, seed=seed, num_inference_steps=steps,
                 guide_level=min(sc.guide_level, max(lvl - 1, 0)), output_type="uint8",
                 progress=False).images for lvl in range(sp.level + 1)]
    labels = [tax.prompt(t) for t in tax.ancestors(sp)]
    path.parent.mkdir(parents=True, exist_ok=True)
    size = rows[0].shape[-1]
    labelled_grid(rows, labels, [f"seed {seed} #{i}" for i in range(n)],
                  cell=max(96, min(size, 256))).save(path)
    return {"file": path.relative_to(path.parents[1]).as_posix(), "species": str(sp),
            "binomial": sp.binomial if sp.rank == "species" else lineage, "n": n,
            "steps": steps, "seed": seed, "scheduler": sc.scheduler}


def default_base_model(cfg) -> str | None:
    """The SD base's hub id: model.pretrained when it is one, or the id in a hub-cache snapshot path."""
    if cfg.model.base != "sd15":
        return None
    src = cfg.model.pretrained
    m = re.search(r"models--([^/]+)--([^/]+)/snapshots", src)
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    return src if HUB_ID.fullmatch(src) and not Path(src).expanduser().exists() else None


def model_card(cfg, pipe: TaxaDiffusionPipeline, *, repo_id: str, base_model: str | None,
               datasets: Sequence[str], license: str | None, metrics: list[tuple[str, str]],
               grid: dict) -> str:
    import yaml
    from . import __version__
    tax, sc = pipe.taxonomy, pipe.sample_config
    has_lora = bool(pipe.config.lora_weight_name)
    header = {"library_name": "diffusers", "pipeline_tag": "text-to-image",
              "license": license or (SD15_LICENSE if cfg.model.base == "sd15" else "mit")}
    base_model = base_model or default_base_model(cfg)
    if base_model:
        header["base_model"] = base_model
    if datasets:
        header["datasets"] = list(datasets)
    header["tags"] = CARD_TAGS + (["lora"] if has_lora else []) + (
        ["stable-diffusion"] if cfg.model.base == "sd15" else [])
    images = sum(tax.count(t) for t in tax.vocab(0))
    sizes = ", ".join(f"{n} {r}" for r, n in tax.summary().items())
    m = cfg.model
    lines = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
             f"# {cfg.name}", "",
             f"A TaxaDiffusion model (taxonomy-aware diffusion, ICCV 2025) exported by taxadiffusion "
             f"{__version__}: strategy `{cfg.train.strategy}` on the `{m.base}` backbone"
             + (f" ({base_model})" if base_model else "") + f", {tax.num_levels} ranks ({sizes}), "
             f"{images} training images (`{cfg.data.format}` metadata) at {cfg.data.resolution} px.",
             ""]
    if has_lora:
        lines += [f"The LoRA (r {m.lora_rank}, alpha {m.lora_alpha}: scale {m.lora_alpha / m.lora_rank:g})"
                  f" is kept unfused in `{LORA_FILE}` (diffusers' format, its LoraConfig in the file's "
                  f"metadata); `unet/` holds the base weights.", ""]
    lines += ["## Use", "", "```python",
              "from taxadiffusion.pipeline import TaxaDiffusionPipeline  # pip install taxadiffusion",
              "", f'pipe = TaxaDiffusionPipeline.from_pretrained("{repo_id}")',
              f'image = pipe("{grid["binomial"]}").images[0]  # a name, binomial or "A > B > C"',
              "```", "",
              "With diffusers alone (taxadiffusion installed):", "", "```python",
              "from diffusers import DiffusionPipeline", "",
              f'pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)', "```",
              "", f"`trust_remote_code=True` is how diffusers loads a pipeline class it does not ship: "
              f"it runs `{SHIM_FILE}`, whose one line imports the installed taxadiffusion package.", "",
              "## Sampling defaults", "",
              "A call uses these unless told otherwise (`sample_defaults` in model_index.json):", "",
              "| setting | value |", "|---|---|",
              *[f"| {k} | {v} |" for k, v in dataclasses.asdict(sc).items()], "",
              "## Trait grid", "", f"![trait grid]({grid['file']})", "",
              f"One row per rank for {grid['species']} (the species with the most training images), "
              f"the same {grid['n']} seeds in each row, {grid['steps']} steps of {grid['scheduler']}: a "
              f"quick preview of the export, not the {sc.steps}-step default.", "", "## Evaluation", ""]
    if not metrics:
        lines += ["The run had no evaluation (`taxadiffusion evaluate RUN` writes eval/<tag>/).", ""]
    for tag, md in metrics:
        body = [("##" + s if s.startswith("#") else s) for s in md.splitlines()
                if not s.startswith("# ")]
        lines += [f"### {tag}", "", f"Files: `eval/{tag}/metrics.json`.", "", *body, ""]
    lines += ["## Training configuration", "", "`training_config.json`, the resolved run config:", "",
              "```yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def push_folder(folder: str | Path, repo_id: str, private: bool = False) -> object:
    """Upload an export to the hub: HfApi.create_repo (exist_ok) then HfApi.upload_folder. Needs a
    network and a token (HF_TOKEN or `huggingface-cli login`). The upload itself is untested here:
    the tests run offline and replace these two HfApi methods, checking the folder and repo given."""
    from huggingface_hub import HfApi
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    return api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             commit_message="TaxaDiffusion export (taxadiffusion export)")
