"""A saved pipeline in diffusers' layout, and `taxadiffusion export`: a run as a hub-ready folder.

`export_run(RUN, OUT)` writes (write_pipeline writes the first four lines alone):
  model_index.json        pipeline class, components, the taxonomy, the call defaults
                          (sample_defaults: the run's sample section) and lora_weight_name
  unet/ text_encoder/ tokenizer/ scheduler/ [vae/] [conditioner/]   safetensors + JSON per component
  pytorch_lora_weights.safetensors   the LoRA unfused, diffusers' format ("unet." keys), its
                          LoraConfig in the file's metadata (diffusers' lora_adapter_metadata)
  taxadiffusion_pipeline.py          SHIM_SOURCE: one import of the installed package, nothing else
  README.md (model card with the hub's YAML header), training_config.json, samples/trait-grid.png,
  eval/<tag>/metrics.json + metrics.md (the run's evaluations, if any)

Two loaders read it:
- TaxaDiffusionPipeline.from_pretrained(OUT) (read_pipeline): JSON is read and the classes of
  COMPONENTS and pipeline.SCHEDULERS are built; the shim is never imported, a class name in the folder
  is only compared with those.
- diffusers.DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True), taxadiffusion installed:
  diffusers 0.42.1 resolves `_class_name` as getattr(diffusers, name) unless it is [module, class]
  with <module>.py in the folder (pipeline_loading_utils._resolve_custom_pipeline_and_cls), and it
  runs a local .py file only with trust_remote_code=True (dynamic_modules_utils
  .get_cached_module_file), so that flag cannot be avoided; the file it runs is the shim. The shim's
  import puts taxadiffusion.conditioning in sys.modules, where diffusers looks the conditioner's
  library up (it never imports a library named in a folder: _get_library_or_raise).
Both end with register_to_config(_name_or_path=...), where the pipeline loads its LoRA (pipeline.py).
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Sequence

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from .conditioning import TaxonomyConditioner
from .pipeline import PIPELINE_FILE, SCHEDULERS, TaxaDiffusionPipeline, make_scheduler

OLD_PIPELINE_FILE = "taxadiffusion.json"  # the layout before this one: not read any more
LORA_FILE = "pytorch_lora_weights.safetensors"
SHIM_MODULE = "taxadiffusion_pipeline"
SHIM_FILE = SHIM_MODULE + ".py"
SHIM_SOURCE = ("# The pipeline class of the installed taxadiffusion package; no code of its own.\n"
               "from taxadiffusion.pipeline import TaxaDiffusionPipeline  # noqa: F401\n")
# component -> (library as model_index.json names it, the class built, the class names accepted).
# The conditioner's library is its module, not "taxadiffusion": diffusers finds a component's load
# method by looking up ModelMixin in the library's namespace, which the top-level package lacks.
COMPONENTS = {
    "unet": ("diffusers", UNet2DConditionModel, {"UNet2DConditionModel"}),
    "text_encoder": ("transformers", CLIPTextModel, {"CLIPTextModel"}),
    "tokenizer": ("transformers", CLIPTokenizer, {"CLIPTokenizer", "CLIPTokenizerFast"}),
    "vae": ("diffusers", AutoencoderKL, {"AutoencoderKL"}),
    "conditioner": ("taxadiffusion.conditioning", TaxonomyConditioner, {"TaxonomyConditioner"}),
}
CARD_TAGS = ["diffusers", "text-to-image", "taxonomy", "taxadiffusion", "biology"]
SD15_LICENSE = "creativeml-openrail-m"  # SD v1.5's weights are part of the export
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


# -- the folder ------------------------------------------------------------------------------------------
def lora_metadata(unet, adapter: str) -> dict:
    """The adapter's LoraConfig as JSON values (sets sorted, so the file is reproducible); diffusers'
    loader builds LoraConfig(**this), so the reloaded LoRA scales by the trained alpha / r."""
    conf = unet.peft_config[adapter].to_dict()
    return json.loads(json.dumps(conf, sort_keys=True, default=lambda o: sorted(o) if isinstance(
        o, (set, frozenset)) else str(o)))


def save_lora_with_config(unet, d: Path) -> None:
    """The UNet's one LoRA adapter (whatever its name), unfused, with its config."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    adapters = list(unet.peft_config)
    if len(adapters) != 1:
        raise ValueError(f"the UNet has adapters {adapters}; a saved pipeline holds exactly one")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapters[0]))
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        d, unet_lora_layers=layers, safe_serialization=True,
        unet_lora_adapter_metadata=lora_metadata(unet, adapters[0]))


def write_pipeline(pipe: TaxaDiffusionPipeline, d: Path) -> None:
    import diffusers
    from . import __version__
    from .checkpoint import save_unet_base
    d.mkdir(parents=True, exist_ok=True)
    has_lora = bool(getattr(pipe.unet, "peft_config", None))
    save_unet_base(pipe.unet, d / "unet")  # the base weights, without the adapter layers
    if has_lora:
        save_lora_with_config(pipe.unet, d)
    pipe.text_encoder.save_pretrained(d / "text_encoder", safe_serialization=True)
    pipe.tokenizer.save_pretrained(d / "tokenizer")
    pipe.scheduler.save_pretrained(d / "scheduler")
    for name in ("vae", "conditioner"):
        if getattr(pipe, name) is not None:
            getattr(pipe, name).save_pretrained(d / name, safe_serialization=True)
    (d / SHIM_FILE).write_text(SHIM_SOURCE)
    index = {"_class_name": [SHIM_MODULE, type(pipe).__name__],
             "_diffusers_version": diffusers.__version__, "_taxadiffusion_version": __version__}
    index.update({k: list(pipe.config[k]) for k in ("unet", "scheduler", "text_encoder",
                                                    "tokenizer", "conditioner", "vae")})
    # the call defaults name the sampler actually saved (a pipeline built in code may differ)
    defaults = dataclasses.asdict(pipe.sample_config)
    defaults["scheduler"] = next((k for k, v in SCHEDULERS.items() if type(pipe.scheduler) is v),
                                 defaults["scheduler"])
    index.update(sample_defaults=defaults,
                 lora_weight_name=LORA_FILE if has_lora else None,
                 taxonomy=pipe.taxonomy.to_dict())
    (d / PIPELINE_FILE).write_text(json.dumps(index, indent=1, ensure_ascii=False))


def read_pipeline(cls, d: Path, torch_dtype: torch.dtype = torch.float32,
                  scheduler: str | None = None) -> TaxaDiffusionPipeline:
    if not (d / PIPELINE_FILE).exists():
        raise FileNotFoundError(
            f"{d} was saved by an older taxadiffusion ({OLD_PIPELINE_FILE}); export it again from its "
            f"run with `taxadiffusion export RUN OUT`" if (d / OLD_PIPELINE_FILE).exists() else
            f"{d} is not a saved TaxaDiffusionPipeline: {PIPELINE_FILE} is missing (a training run or "
            f"checkpoint? use from_checkpoint)")
    index = json.loads((d / PIPELINE_FILE).read_text())
    if index.get("_class_name") not in ([SHIM_MODULE, cls.__name__], cls.__name__):
        raise ValueError(f"{d / PIPELINE_FILE} describes a {index.get('_class_name')!r} pipeline, "
                         f"not a {cls.__name__}")
    kw = dict(use_safetensors=True, local_files_only=True, torch_dtype=torch_dtype)
    parts = {}
    for name, (library, klass, accepted) in COMPONENTS.items():
        lib, cname = index.get(name) or (None, None)
        if lib is None and name in cls._optional_components:
            parts[name] = None
        elif lib != library or cname not in accepted:
            raise ValueError(f"{d / PIPELINE_FILE}: {name} is [{lib}, {cname}]; a {cls.__name__} "
                             f"loads [{library}, {klass.__name__}] there")
        elif klass is CLIPTokenizer:
            parts[name] = klass.from_pretrained(d / name, local_files_only=True)
        else:
            parts[name] = klass.from_pretrained(d / name, **kw).eval()
    lib, cname = index.get("scheduler") or (None, None)
    saved = next((k for k, v in SCHEDULERS.items() if v.__name__ == cname), None)
    if lib != "diffusers" or saved is None:
        raise ValueError(f"{d / PIPELINE_FILE}: scheduler [{lib}, {cname}] is none of "
                         f"{', '.join(v.__name__ for v in SCHEDULERS.values())}")
    conf = SCHEDULERS[saved].load_config(d / "scheduler")
    sched = SCHEDULERS[saved].from_config(conf) if scheduler is None else make_scheduler(scheduler, conf)
    defaults = dict(index.get("sample_defaults") or {}, scheduler=scheduler or saved)
    pipe = cls(scheduler=sched, taxonomy=index["taxonomy"], sample_defaults=defaults,
               lora_weight_name=index.get("lora_weight_name"), **parts)
    pipe.register_to_config(_name_or_path=str(d))  # as diffusers' loader ends: loads the LoRA
    return pipe


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
    from .config import from_dict
    ckpt = resolve_checkpoint(Path(run))
    cfg = from_dict(json.loads((ckpt / "config.json").read_text()))
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
