"""Run checkpoints: safetensors plus JSON, written atomically, loadable without running any code.

A checkpoint folder (runs/<name>/checkpoints/<stage-k-rank>/step-<n> or .../final) holds
- what the pipeline needs: conditioner/ (diffusers ModelMixin folder), pytorch_lora_weights.safetensors
  (diffusers LoRA format), unet/ when UNet weights were trained or the backbone is built in code
  (tiny), text_encoder/ + tokenizer/ (+ vae/) for a tiny backbone, scheduler/ (the one noise
  schedule), taxonomy.json and config.json (the resolved run config);
- what resuming needs: state.json (stage, step, data position), optimizer.safetensors + .json,
  ema.safetensors, rng.safetensors (every rank's torch, CUDA and step-generator state),
  lr_scheduler and the fp16 GradScaler in state.json.
SD v1.5 base weights are not copied: config.json names where they come from.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import Config, config_from_file
from .taxonomy import Taxonomy

STATE_FILE = "state.json"


def save_unet_base(unet, d: Path) -> None:
    """The UNet's own weights without adapter layers (peft wraps targets in `.base_layer`)."""
    d.mkdir(parents=True, exist_ok=True)
    unet.save_config(d)
    base = {k.replace(".base_layer", ""): v.detach().contiguous()
            for k, v in unet.state_dict().items() if "lora_" not in k}
    save_file(base, d / "diffusion_pytorch_model.safetensors")


def lora_metadata(unet, adapter: str) -> dict:
    """The adapter's LoraConfig as JSON values (sets sorted, so the file is reproducible); diffusers'
    loader builds LoraConfig(**this), so the reloaded LoRA scales by the trained alpha / r."""
    conf = unet.peft_config[adapter].to_dict()
    return json.loads(json.dumps(conf, sort_keys=True, default=lambda o: sorted(o) if isinstance(
        o, (set, frozenset)) else str(o)))


def save_lora(unet, d: Path) -> None:
    """The UNet's one LoRA adapter (whatever its name), unfused, in diffusers' format, with its
    config in the file's metadata (as diffusers' training scripts write it), so any loader (ours,
    diffusers' load_lora_weights) scales by alpha / r."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    adapters = list(unet.peft_config)
    if len(adapters) != 1:
        raise ValueError(f"the UNet has adapters {adapters}; a checkpoint holds exactly one")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapters[0]))
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        d, unet_lora_layers=layers, safe_serialization=True,
        unet_lora_adapter_metadata=lora_metadata(unet, adapters[0]))


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        meta["state"][str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous()
                meta["state"][str(pid)][k] = "tensor"
            else:
                meta["state"][str(pid)][k] = v
    return tensors, meta


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = {k: (tensors[f"{pid}.{k}"] if v == "tensor" else v) for k, v in st.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state(generator: torch.Generator | None = None) -> dict[str, bytes]:
    """This process's random state: torch's CPU RNG, the current CUDA device's (dropout on a GPU
    draws from it), and the loop's step generator; bytes, so ranks can gather them as objects."""
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    if generator is not None:
        st["generator"] = generator.get_state()
    return {k: v.numpy().tobytes() for k, v in st.items()}


def save_checkpoint(d: Path, *, cfg: Config, taxonomy: Taxonomy, unet, conditioner, backbone,
                    save_unet: bool, state: dict, optimizer=None, ema=None, lr_scheduler=None,
                    rng_states: list[dict[str, bytes]] | None = None, scaler=None) -> Path:
    """Write everything to `d` through a temporary folder renamed at the end (atomic): a write that
    fails (disk full, read-only folder) removes the temporary folder, leaves every earlier
    checkpoint as it was and raises an error naming the folder.

    `rng_states`: every rank's `rng_state()` in rank order (rng.safetensors keys "<kind>.<rank>"),
    so that after a resume each rank draws its own noise again; `scaler`: fp16's GradScaler."""
    tmp = d.with_name(d.name + ".tmp")
    try:
        _write_checkpoint(tmp, cfg=cfg, taxonomy=taxonomy, unet=unet, conditioner=conditioner,
                          backbone=backbone, save_unet=save_unet, state=state, optimizer=optimizer,
                          ema=ema, lr_scheduler=lr_scheduler, rng_states=rng_states, scaler=scaler)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, f"could not write checkpoint {d} ({e.strerror or e}); free space or "
                               f"fix permissions in {d.parent}; earlier checkpoints are intact") from e
    except Exception as e:  # safetensors reports a full disk as its own error type
        shutil.rmtree(tmp, ignore_errors=True)
        if "No space left" in str(e) or "Read-only" in str(e):
            raise OSError(f"could not write checkpoint {d} ({e}); free space or fix permissions in "
                          f"{d.parent}; earlier checkpoints are intact") from e
        raise
    if d.exists():
        shutil.rmtree(d)
    tmp.rename(d)
    return d


def _write_checkpoint(tmp: Path, *, cfg, taxonomy, unet, conditioner, backbone, save_unet, state,
                      optimizer, ema, lr_scheduler, rng_states, scaler) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if conditioner is not None:
        conditioner.save_pretrained(tmp / "conditioner", safe_serialization=True)
    if getattr(unet, "peft_config", None):
        save_lora(unet, tmp)
    if save_unet or backbone.source == "tiny":
        save_unet_base(unet, tmp / "unet")
    if backbone.source == "tiny":  # random-init parts exist nowhere else
        backbone.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        backbone.tokenizer.save_pretrained(tmp / "tokenizer")
        if backbone.vae is not None:
            backbone.vae.save_pretrained(tmp / "vae", safe_serialization=True)
    backbone.noise_scheduler.save_pretrained(tmp / "scheduler")
    taxonomy.save(tmp / "taxonomy.json")
    (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    state = dict(state)
    if optimizer is not None:
        tensors, meta = _flatten_optimizer(optimizer)
        save_file(tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(meta))
    if ema is not None:
        save_file({str(i): p.detach().contiguous() for i, p in enumerate(ema.shadow_params)},
                  tmp / "ema.safetensors")
        state["ema"] = {"optimization_step": ema.optimization_step, "decay": ema.decay}
    if lr_scheduler is not None:
        state["lr_scheduler"] = {k: v for k, v in lr_scheduler.state_dict().items()
                                 if k != "lr_lambdas"}
    if scaler is not None:
        state["grad_scaler"] = scaler.state_dict()
    rng = {f"{k}.{r}": torch.frombuffer(bytearray(b), dtype=torch.uint8)
           for r, st in enumerate(rng_states or [rng_state()]) for k, b in st.items()}
    state["world_size"] = len(rng_states or [None])
    save_file(rng, tmp / "rng.safetensors")
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))


def read_tensors(f: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file; a missing or damaged one is named, with what to do."""
    if not f.exists():
        raise FileNotFoundError(f"{f} is missing: this checkpoint is incomplete; resume from an "
                                f"earlier one with --resume <its folder>")
    try:
        return load_file(f)
    except Exception as e:  # SafetensorError, OSError: truncated, edited or unreadable
        raise ValueError(f"{f} is damaged ({type(e).__name__}: {e}); resume from an earlier "
                         f"checkpoint with --resume <its folder>") from e


def read_json(f: Path):
    if not f.exists():
        raise FileNotFoundError(f"{f} is missing: this checkpoint is incomplete; resume from an "
                                f"earlier one with --resume <its folder>")
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f} is damaged ({e}); resume from an earlier checkpoint with --resume "
                         f"<its folder>") from e


def load_training_state(d: Path, optimizer=None, ema=None, lr_scheduler=None,
                        generator: torch.Generator | None = None, rank: int = 0, scaler=None) -> dict:
    """Restore what `save_checkpoint` wrote into live objects; this rank's random state. Every
    file the live objects need must be there: a missing or damaged one is an error naming it."""
    state = read_json(d / STATE_FILE)
    if optimizer is not None:
        meta, tensors = read_json(d / "optimizer.json"), read_tensors(d / "optimizer.safetensors")
        try:
            optimizer.load_state_dict(_unflatten_optimizer(tensors, meta))
        except (KeyError, ValueError, RuntimeError) as e:
            raise ValueError(f"{d / 'optimizer.safetensors'} does not fit this run's trainable "
                             f"parameters ({e})") from e
    if ema is not None:
        if "ema" not in state:
            raise ValueError(f"{d} holds no EMA state, but train.ema_decay is on: it was trained "
                             f"without EMA")
        t = read_tensors(d / "ema.safetensors")
        ema.shadow_params = [t[str(i)].to(p.device) for i, p in enumerate(ema.shadow_params)]
        ema.optimization_step = state["ema"]["optimization_step"]
    if lr_scheduler is not None and "lr_scheduler" in state:
        lr_scheduler.load_state_dict({**lr_scheduler.state_dict(), **state["lr_scheduler"]})
    if scaler is not None and "grad_scaler" in state:
        scaler.load_state_dict(state["grad_scaler"])
    rng = read_tensors(d / "rng.safetensors")
    if f"torch.{rank}" not in rng:
        raise ValueError(f"{d / 'rng.safetensors'} holds the random state of "
                         f"{state.get('world_size', 1)} process(es), none for rank {rank}: resume "
                         f"with the number of processes that wrote it")
    torch.set_rng_state(rng[f"torch.{rank}"])
    if f"cuda.{rank}" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng[f"cuda.{rank}"])
    if generator is not None and f"generator.{rank}" in rng:
        generator.set_state(rng[f"generator.{rank}"])
    return state


def load_model_state(d: Path, unet, conditioner) -> None:
    """Trained weights of a checkpoint into live modules (resume, or a later stage's start). A file
    that is damaged or does not fit the modules (missing keys, other shapes) is named."""
    if conditioner is not None and (d / "conditioner").exists():
        f = d / "conditioner" / "diffusion_pytorch_model.safetensors"
        _load_into(conditioner, read_tensors(f), f)
    if (d / "unet").exists():
        f = d / "unet" / "diffusion_pytorch_model.safetensors"
        base = read_tensors(f)
        # peft renames wrapped weights to <module>.base_layer.<param>
        want = {k: k.replace(".base_layer", "") for k in unet.state_dict() if "lora_" not in k}
        missing = sorted(v for v in want.values() if v not in base)
        if missing:
            raise ValueError(f"{f} lacks {len(missing)} UNet weight(s) ({', '.join(missing[:3])}, ...): "
                             f"not this run's UNet, or damaged")
        _load_into(unet, {k: base[v] for k, v in want.items()}, f, strict=False)
    lora = d / "pytorch_lora_weights.safetensors"
    if lora.exists():
        from peft.utils import set_peft_model_state_dict
        from diffusers.utils import convert_unet_state_dict_to_peft
        sd = read_tensors(lora)
        sd = {k[len("unet."):]: v for k, v in sd.items() if k.startswith("unet.")}
        try:
            res = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(sd))
        except RuntimeError as e:  # another rank or target layout: shapes do not fit
            raise ValueError(f"{lora} does not fit this run's LoRA ({str(e).splitlines()[0]})") from e
        if getattr(res, "unexpected_keys", None):
            raise ValueError(f"{lora}: unexpected LoRA keys {res.unexpected_keys[:5]}")


def _load_into(module, state: dict, f: Path, strict: bool = True) -> None:
    try:
        module.load_state_dict(state, strict=strict)
    except RuntimeError as e:  # missing/unexpected keys or size mismatch
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        raise ValueError(f"{f} does not fit the model it is loaded into: "
                         f"{'; '.join(lines[1:3]) or lines[0]}") from e


_STEP = re.compile(r"step-(\d+)$")


def list_checkpoints(run: Path) -> list[tuple[int, int, Path]]:
    """(stage index, step, folder) sorted; a stage's `final` sorts after all its steps."""
    out = []
    for d in (run / "checkpoints").glob("stage-*/*"):
        if not (d / STATE_FILE).exists() or d.name.endswith(".tmp"):
            continue
        st = read_json(d / STATE_FILE)
        out.append((st["stage_index"], st["step"] + (10**12 if st.get("complete") else 0), d))
    return sorted(out)


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder as is; a run folder: its latest checkpoint."""
    path = Path(path)
    if (path / STATE_FILE).exists():
        return path
    if (path / "checkpoints").exists():
        found = list_checkpoints(path)
        if found:
            return found[-1][2]
    raise FileNotFoundError(f"{path} holds no checkpoint (expected {STATE_FILE} or checkpoints/)")


def load_pipeline_parts(d: Path, torch_dtype: torch.dtype = torch.float32,
                        pretrained: str | None = None) -> tuple[dict, Config]:
    """The modules a pipeline needs, from a checkpoint folder; SD base weights from the config's
    model.pretrained, or from `pretrained` (the base moved, or another machine)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from .backbone import add_lora, load_sd15
    from .conditioning import TaxonomyConditioner
    cfg = config_from_file(d / "config.json")
    if pretrained:
        cfg.model.pretrained = pretrained
    kw = dict(use_safetensors=True, local_files_only=True, torch_dtype=torch_dtype)
    if cfg.model.base != "sd15":  # built in code: the checkpoint carries every part
        unet = UNet2DConditionModel.from_pretrained(d / "unet", **kw)
        te = CLIPTextModel.from_pretrained(d / "text_encoder", **kw)
        tok = CLIPTokenizer.from_pretrained(d / "tokenizer", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(d / "vae", **kw) if (d / "vae").exists() else None
    else:
        bb = load_sd15(cfg.model, torch_dtype)
        unet, te, tok, vae = bb.unet, bb.text_encoder, bb.tokenizer, bb.vae
    cond = None
    if (d / "conditioner").exists():
        cond = TaxonomyConditioner.from_pretrained(d / "conditioner", **kw)
    if (d / "pytorch_lora_weights.safetensors").exists():
        add_lora(unet, cfg.model)
    load_model_state(d, unet, None)  # the conditioner came complete from its folder
    for m in (unet, te, vae, cond):
        if m is not None:
            m.eval().requires_grad_(False)
    sched = DDPMScheduler.from_pretrained(d / "scheduler")
    return dict(unet=unet, text_encoder=te, tokenizer=tok, vae=vae, conditioner=cond,
                taxonomy=Taxonomy.load(d / "taxonomy.json"), noise_scheduler=sched), cfg
