"""Typed configuration: defaults are the paper's values (Table S1, Sec. A); YAML presets; dotted overrides.

`load_config("configs/tiny-cpu.yaml", ["train.batch_size=8", "data.root=/data/cub"])` reads a preset,
applies `key=value` overrides (values parsed as YAML, checked against the field's type) and returns a
`Config`. `save_config` writes the resolved config that travels with every run and checkpoint.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import yaml

PRESET_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    format: str = "csv"                 # reader: see datasets.READERS
    metadata: str | None = None         # metadata file; csv: defaults to <root>/metadata.csv
    root: str | None = None             # image root
    ranks: list[str] | None = None      # modelled ranks; None: every rank the format provides
    missing_ranks: str = "fill"         # fill "<rank>: None" (the released code) | keep | drop
    strict: bool = False                # a name under two parents is an error, not a warning
    species_prompt: str = "binomial"    # "species: Genus epithet"; "epithet" = released code's prompt
    resolution: int = 512               # paper Table S1: 512 x 512
    preprocess: str | None = None       # None: the format's own (fishnet | bioscan | inat | center)
    num_workers: int = 4                # dataloader workers
    cache_latents: bool = True          # encode each image with the VAE once (no random crops then)


@dataclass
class ModelConfig:
    base: str = "sd15"                  # sd15: SD v1.5 weights; tiny: built in code; sd15-random: SD shapes, random
    pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # local folder or hub id (cache only)
    # tiny backbone (base: tiny); the measured CPU model of DESIGN.md
    pretrained_unet: str | None = None  # tiny: "builtin" / "builtin-3600" (shipped bases, tinybase.BUILTIN) or a folder
    pixel_space: bool = True            # tiny: diffuse pixels (no VAE)
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    cross_attn_levels: list[bool] = field(default_factory=lambda: [False, True, True])  # 32x32 attention costs 7x
    attention_head_dim: int = 8
    text_width: int = 64                # tiny CLIP text encoder width = cross-attention width
    text_layers: int = 2
    text_heads: int = 4
    text_token_std: float | None = None  # tiny: token-embedding init std (None: CLIP's 0.02; README)
    # per-level condition module (paper Sec. 3.2; released code: nn.TransformerEncoder defaults)
    level_layers: int = 2               # 2 transformer encoder layers per level
    level_heads: int = 8                # 8 heads (tiny: must divide text_width)
    level_ff: int = 2048                # feed-forward width (tiny: scaled with the width)
    level_dropout: float = 0.1          # nn.TransformerEncoderLayer default, as released
    zero_init: bool = True              # new level starts at zero output: stage k starts at stage k-1
    level_out_proj: bool = False        # not in the paper: zero-init Linear after levels >= 1 (README)
    # LoRA (paper Sec. A.2; released code: r 4, alpha 4, gaussian init)
    lora_rank: int = 4
    lora_alpha: int = 4
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # one noise schedule for training and sampling (SD v1.5 scheduler config)
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000


@dataclass
class TrainConfig:
    strategy: str = "progressive"       # progressive | all | random | lora-text | full (stages.py)
    stages: str = "all"                 # "all", one stage index, or a comma list
    steps_per_stage: int = 250_000      # paper Table S1: 250K per level
    steps_stage0: int | None = None     # None: steps_per_stage
    lr_stage0: float = 1e-4             # stage 0 (LoRA + level 0), SD+LoRA baseline
    lr: float = 1e-5                    # stages k >= 1, full fine-tune
    train_unet_stage0: bool = False     # a from-scratch UNet has no base: stage 0 trains it all
    unet_every_stage: bool = False      # progressive k >= 1 also train LoRA/UNet; paper: frozen (README)
    train_earlier_levels: bool = False  # progressive k >= 1 also train levels 0..k-1; paper: frozen
    batch_size: int = 12                # per device; paper: 12 per GPU, 192 total
    gradient_accumulation_steps: int = 1
    adam_beta1: float = 0.9             # released code: AdamW defaults
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    lr_warmup_steps: int = 0            # released code: constant lr
    max_grad_norm: float = 1.0
    snr_gamma: float | None = None      # min-SNR loss weighting (diffusers' --snr_gamma); paper: plain MSE
    # no | fp16 | bf16; None: the launcher's (`accelerate launch --mixed_precision`), else fp32 as
    # released. Frozen parts run in it; trainable parameters and checkpoints stay fp32.
    mixed_precision: str | None = None
    report_to: str = "tensorboard"      # tensorboard | wandb | none (accelerate trackers)
    gradient_checkpointing: bool = False
    p_uncond: float = 0.1               # drop every level: trains the CFG branch
    p_prefix: float = 0.1               # cut to a shorter lineage: trains TaxaGuide's reference
    ema_decay: float = 0.0              # 0: off; EMA of trainable weights, used for sampling
    seed: int = 42
    checkpoint_every: int = 5000
    keep_checkpoints: int = 2           # step checkpoints kept per stage (stage ends always kept)
    validate_every: int = 5000
    validation_seeds: int = 4           # images per row of the validation grid (0: no grids)
    fixed_batch: int = 64               # held-out-noise batch whose loss is logged per stage (0: off)
    log_every: int = 50
    output_dir: str = "runs"


@dataclass
class SampleConfig:
    guidance: str = "taxa"              # taxa | cfg | none
    scale: float = 6.0                  # paper Sec. A.1: 6 (diffusers convention, s = 1 + w)
    guide_level: int = 0                # TaxaGuide reference level (paper: 0)
    steps: int = 250                    # paper Sec. A.1: 250
    scheduler: str = "ddpm"             # see pipeline.SCHEDULERS
    guidance_start: float = 0.0         # fraction of the trajectory where guidance starts
    guidance_stop: float = 1.0
    batch_size: int = 16


@dataclass
class EvalConfig:
    n_per_taxon: int = 50               # paper Table S2: 15-50 images per species
    levels: list[str] | None = None     # None: every level
    fid_weights: str | None = None      # FID Inception weights (.pth); None: torch-fidelity's cache
    bioclip: str = "hf-hub:imageomics/bioclip"
    lpips_net: str = "alex"


@dataclass
class Config:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against the annotated type `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errs = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except TypeError as e:
                errs.append(str(e))
        raise TypeError(f"{key}: {value!r} does not fit {tp}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise TypeError(f"{key}: expected a list, got {value!r}")
        return [_coerce(inner, v, key) for v in value]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads `1e-2` (no dot) as a string; float() reads it as everyone means it
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # `train.stages=0` or `name=2024`: YAML read a number, the field is text
    raise TypeError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(d: dict, cls: type = Config, prefix: str = "") -> Any:
    """Build a dataclass from nested dicts; unknown keys are errors that name the key."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise KeyError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                       f"known under {prefix or 'top level'}: {', '.join(sorted(known))}")
    kw = {}
    for k, v in d.items():
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                raise TypeError(f"{prefix}{k}: expected a mapping")
            kw[k] = from_dict(v, tp, f"{prefix}{k}.")
        else:
            kw[k] = _coerce(tp, v, prefix + k)
    return cls(**kw)


def resolve_preset(path: str | Path) -> Path:
    """A YAML path, or a preset name shipped with the package ("tiny-cpu")."""
    p = Path(path)
    if p.exists():
        return p
    q = PRESET_DIR / (p.name if p.suffix else p.name + ".yaml")
    if q.exists():
        return q
    names = ", ".join(sorted(x.stem for x in PRESET_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"config {path} not found; presets shipped: {names}")


def apply_overrides(d: dict, overrides: Sequence[str]) -> dict:
    """`section.key=value` (value parsed as YAML) into the nested dict `d`, in place."""
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"override {o!r} is not key=value (e.g. train.batch_size=8)")
        key, val = o.split("=", 1)
        node = d
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise KeyError(f"override {o!r}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(val) if val.strip() else None
    return d


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    d = yaml.safe_load(resolve_preset(path).read_text()) if path else {}
    d = apply_overrides(d or {}, overrides)
    return from_dict(d)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_file(path: str | Path) -> Config:
    """A resolved config written by `save_config` (YAML) or stored as JSON in a checkpoint."""
    p = Path(path)
    text = p.read_text()
    d = yaml.safe_load(text)  # JSON is YAML
    return from_dict(d)
