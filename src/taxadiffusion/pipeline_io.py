"""A saved TaxaDiffusionPipeline on disk: diffusers' layout, safetensors and JSON only.

  model_index.json        pipeline class, components, the taxonomy, the call defaults
                          (sample_defaults: the run's sample section) and lora_weight_name
  unet/ text_encoder/ tokenizer/ scheduler/ [vae/] [conditioner/]   safetensors + JSON per component
  pytorch_lora_weights.safetensors   the LoRA unfused, diffusers' format ("unet." keys), its
                          LoraConfig in the file's metadata (diffusers' lora_adapter_metadata)
  taxadiffusion_pipeline.py          SHIM_SOURCE: one import of the installed package, nothing else

Two loaders read it:
- TaxaDiffusionPipeline.from_pretrained(OUT) (read_pipeline): JSON is read and the classes of
  COMPONENTS and SCHEDULERS are built; the shim is never imported, a class name in the folder is
  only compared with those.
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
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from .checkpoint import save_lora, save_unet_base
from .conditioning import TaxonomyConditioner
from .schedulers import SCHEDULERS, make_scheduler

PIPELINE_FILE = "model_index.json"   # what marks a saved pipeline
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

# -- the folder ------------------------------------------------------------------------------------------
def write_pipeline(pipe, d: Path) -> None:
    """`pipe` (a TaxaDiffusionPipeline) in diffusers' layout, as the module docstring lists."""
    import diffusers
    from . import __version__
    d.mkdir(parents=True, exist_ok=True)
    has_lora = bool(getattr(pipe.unet, "peft_config", None))
    save_unet_base(pipe.unet, d / "unet")  # the base weights, without the adapter layers
    if has_lora:
        save_lora(pipe.unet, d)
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
                  scheduler: str | None = None):
    """A pipeline of class `cls` from `d`: JSON read, the classes of COMPONENTS and SCHEDULERS
    built; nothing in the folder is imported or run."""
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
