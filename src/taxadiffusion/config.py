"""Typed configuration: defaults are the paper's values (Table S1, Sec. A); YAML presets; dotted overrides.

`load_config("configs/tiny-cpu.yaml", ["train.batch_size=8", "data.root=/data/cub"])` reads a preset,
applies `key=value` overrides (values parsed as YAML) and returns a `Config`. `save_config` writes the
resolved config that travels with every run and checkpoint.

Values are checked where they enter, in one place: each field's type and `Rule` (`_f(default, rule)`)
and a few cross-field checks, run by `__post_init__`, so files, overrides and direct construction all
refuse a batch of 0, NaN (NaN weights, invalid JSON) or a run name like `../../x`, in one line naming
the field, the value, what is allowed and, for a value read from a file, the file. No torch here.
"""
from __future__ import annotations

import contextvars
import dataclasses
import math
import re
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import yaml

PRESET_DIR = Path(__file__).parent / "configs"

# Allowed names of enumerated fields. These copy lists that live in modules importing torch and this
# module (importing them here would be a cycle and make configs need torch); tests/test_validation.py
# checks each copy against its source. datasets.READERS imports neither, so it is read lazily.
STRATEGIES = ("progressive", "all", "random", "lora-text", "full")     # stages.STRATEGIES
SCHEDULERS = ("ddpm", "ddim", "dpm++", "euler", "euler-a", "pndm", "unipc")  # pipeline.SCHEDULERS
TRACKERS = ("tensorboard", "wandb", "none")                             # training.TRACKERS
BASES = ("tiny", "sd15", "sd15-random")                                 # backbone.BUILDERS
PREPROCESS = ("fishnet", "bioscan", "inat", "center")                   # datasets.images.PREPROCESS
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")       # the ones every sampler takes
GUIDANCE = ("taxa", "cfg", "none")
MIXED_PRECISION = ("no", "fp16", "bf16")                                 # accelerate's names
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,255}")  # a run name is one folder under output_dir


def _readers() -> tuple[str, ...]:
    from .datasets import READERS
    return tuple(READERS)


# -- rules ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """What a field allows beyond its type: `ok(value)`, and `words()` for the error ("in [0, 1)")."""
    ok: Callable[[Any], bool]
    words: Callable[[], str]


def ge(lo: float) -> Rule:
    return Rule(lambda v: v >= lo, lambda: f">= {lo}")


def gt(lo: float) -> Rule:
    return Rule(lambda v: v > lo, lambda: f"> {lo}")


def between(lo: float, hi: float, hi_open: bool = False) -> Rule:
    return Rule(lambda v: lo <= v < hi if hi_open else lo <= v <= hi,
                lambda: f"in [{lo}, {hi}{')' if hi_open else ']'}")


def one_of(names: Sequence[str] | Callable[[], Sequence[str]]) -> Rule:
    """Allowed names; a callable is read when checked (lazy import)."""
    get = names if callable(names) else (lambda: names)
    return Rule(lambda v: v in get(), lambda: "one of " + ", ".join(get()))


def each(rule: Rule | None = None) -> Rule:
    return Rule(lambda v: len(v) > 0 and (rule is None or all(rule.ok(x) for x in v)),
                lambda: "a non-empty list" + (f" of items {rule.words()}" if rule else ""))


def distinct() -> Rule:
    return Rule(lambda v: len(v) > 0 and len(set(v)) == len(v), lambda: "a non-empty list without repeats")


STAGES = Rule(lambda v: re.fullmatch(r"\s*(all|\d+(\s*,\s*\d+)*)\s*", v) is not None,
              lambda: "'all', a stage index or a comma list of them (0,1)")
RUN_NAME = Rule(lambda v: NAME_RE.fullmatch(v) is not None and v not in (".", ".."),
                lambda: "a folder name of letters, digits, '.', '_' and '-' (no path separators, not . or ..)")
SEED = between(0, 2**32 - 1)  # accelerate's set_seed seeds numpy, which takes seeds < 2**32
RESOLUTION = Rule(lambda v: v > 0 and v % 8 == 0, lambda: "> 0 and a multiple of 8 (the VAE's factor)")


def _f(default: Any = dataclasses.MISSING, rule: Rule | None = None, *, factory: Any = dataclasses.MISSING):
    """A field with its rule; `factory` for a list default."""
    return field(default=default, default_factory=factory, metadata={"rule": rule} if rule else {})


def _err(cls: type, keys: str | Sequence[str], msg: str) -> Exception:
    """An exception of `cls` that records the dotted key(s) at fault (load_config names the file)."""
    e = cls(msg)
    e.config_keys = (keys,) if isinstance(keys, str) else tuple(keys)
    return e


def _require(ok: bool, keys: Sequence[str], msg: str) -> None:
    if not ok:  # a cross-field check
        raise _err(ValueError, keys, msg)


class _Checked:
    """Base of the config sections: `__post_init__` checks every field against type and rule."""
    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        prefix = _PREFIX.get()
        prefix = prefix if prefix is not None else (self.SECTION + "." if self.SECTION else "")
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            tp, key, value = hints[f.name], prefix + f.name, getattr(self, f.name)
            if dataclasses.is_dataclass(tp):
                if not isinstance(value, tp):
                    raise _err(TypeError, key, f"{key}: expected a {tp.__name__} (mapping), got {value!r}")
                continue
            rule = f.metadata.get("rule")
            value = _coerce(tp, value, key, rule)
            setattr(self, f.name, value)
            if rule is not None and value is not None and not rule.ok(value):
                raise _err(ValueError, key, f"{key}: {value!r} is not allowed; expected "
                                            f"{_type_name(tp, number_only=True)}{rule.words()}")
        self.check(prefix)

    def check(self, p: str) -> None:
        """Cross-field checks (p: the section's key prefix)."""


_PREFIX: contextvars.ContextVar[str | None] = contextvars.ContextVar("config_prefix", default=None)


# -- the config sections -------------------------------------------------------------------------
@dataclass
class DataConfig(_Checked):
    SECTION: ClassVar[str] = "data"
    format: str = _f("csv", one_of(_readers))  # reader: see datasets.READERS
    metadata: str | None = None         # metadata file; csv: defaults to <root>/metadata.csv
    root: str | None = None             # image root
    ranks: list[str] | None = _f(None, distinct())  # modelled ranks; None: every rank the format provides
    # fill "<rank>: None" (the released code) | keep | drop
    missing_ranks: str = _f("fill", one_of(("fill", "keep", "drop")))
    strict: bool = False                # a name under two parents is an error, not a warning
    # "species: Genus epithet"; "epithet" = released code's prompt
    species_prompt: str = _f("binomial", one_of(("binomial", "epithet")))
    resolution: int = _f(512, RESOLUTION)  # paper Table S1: 512 x 512
    preprocess: str | None = _f(None, one_of(PREPROCESS))  # None: the format's own (fishnet | bioscan | inat | center)
    num_workers: int = _f(4, ge(0))     # dataloader workers
    cache_latents: bool = True          # encode each image once (latent_cache.py); random crops kept
    cache_dir: str | None = None        # input cache folder; None: <run>/latents (a named one is never overwritten)
    # px encoded beyond resolution for random latent windows (multiple of 8); None: 0 for bioscan/center, else resolution/8
    cache_margin: int | None = _f(None, Rule(lambda v: v >= 0 and v % 8 == 0, lambda: ">= 0 and a multiple of 8"))
    cache_flip: bool = False            # also cache each mirrored image's latent (2x disk): random flips (released: none)


@dataclass
class ModelConfig(_Checked):
    SECTION: ClassVar[str] = "model"
    # sd15: SD v1.5 weights; tiny: built in code; sd15-random: SD shapes, random
    base: str = _f("sd15", one_of(BASES))
    pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # local folder or hub id (cache only)
    # tiny backbone (base: tiny); the measured CPU model of DESIGN.md
    pretrained_unet: str | None = None  # tiny: "builtin" / "builtin-3600" (shipped bases, tinybase.BUILTIN) or a folder
    pixel_space: bool = True            # tiny: diffuse pixels (no VAE)
    block_out_channels: list[int] = _f(rule=each(ge(1)), factory=lambda: [32, 64, 64])
    layers_per_block: int = _f(1, ge(1))
    # 32x32 attention costs 7x
    cross_attn_levels: list[bool] = _f(rule=each(), factory=lambda: [False, True, True])
    attention_head_dim: int = _f(8, ge(1))
    text_width: int = _f(64, ge(1))     # tiny CLIP text encoder width = cross-attention width
    text_layers: int = _f(2, ge(1))
    text_heads: int = _f(4, ge(1))
    text_token_std: float | None = _f(None, gt(0))  # tiny: token-embedding init std (None: CLIP's 0.02; README)
    # per-level condition module (paper Sec. 3.2; released code: nn.TransformerEncoder defaults)
    level_layers: int = _f(2, ge(1))    # 2 transformer encoder layers per level
    level_heads: int = _f(8, ge(1))     # 8 heads (tiny: must divide text_width)
    level_ff: int = _f(2048, ge(1))     # feed-forward width (tiny: scaled with the width)
    # nn.TransformerEncoderLayer default, as released
    level_dropout: float = _f(0.1, between(0, 1, hi_open=True))
    zero_init: bool = True              # new level starts at zero output: stage k starts at stage k-1
    level_out_proj: bool = False        # not in the paper: zero-init Linear after levels >= 1 (README)
    # LoRA (paper Sec. A.2; released code: r 4, alpha 4, gaussian init)
    lora_rank: int = _f(4, ge(1))
    lora_alpha: int = _f(4, ge(1))
    lora_targets: list[str] = _f(rule=distinct(), factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # one noise schedule for training and sampling (SD v1.5 scheduler config)
    beta_schedule: str = _f("scaled_linear", one_of(BETA_SCHEDULES))
    beta_start: float = _f(0.00085, between(0, 1, hi_open=True))
    beta_end: float = _f(0.012, between(0, 1, hi_open=True))
    num_train_timesteps: int = _f(1000, ge(1))

    def check(self, p: str) -> None:
        n, m = len(self.block_out_channels), len(self.cross_attn_levels)
        _require(m >= n, [p + "cross_attn_levels"], f"{p}cross_attn_levels: {m} flag(s) for {n} "
                 f"block(s) of {p}block_out_channels; expected one per block")
        _require(self.beta_start < self.beta_end, [p + "beta_start", p + "beta_end"],
                 f"{p}beta_start {self.beta_start} must be below {p}beta_end {self.beta_end}")
        if self.base == "tiny":  # the tiny text encoder's width is ours to choose; SD's is 768
            for k in ("text_heads", "level_heads"):
                _require(self.text_width % getattr(self, k) == 0, [p + k, p + "text_width"],
                         f"{p}{k} {getattr(self, k)} must divide {p}text_width {self.text_width}")


@dataclass
class TrainConfig(_Checked):
    SECTION: ClassVar[str] = "train"
    strategy: str = _f("progressive", one_of(STRATEGIES))  # progressive | all | random | lora-text | full (stages.py)
    stages: str = _f("all", STAGES)     # "all", one stage index, or a comma list
    steps_per_stage: int = _f(250_000, ge(0))  # paper Table S1: 250K per level
    steps_stage0: int | None = _f(None, ge(1))  # None: steps_per_stage
    lr_stage0: float = _f(1e-4, gt(0))  # stage 0 (LoRA + level 0), SD+LoRA baseline
    lr: float = _f(1e-5, gt(0))         # stages k >= 1, full fine-tune
    train_unet_stage0: bool = False     # a from-scratch UNet has no base: stage 0 trains it all
    unet_every_stage: bool = False      # progressive k >= 1 also train LoRA/UNet; paper: frozen (README)
    train_earlier_levels: bool = False  # progressive k >= 1 also train levels 0..k-1; paper: frozen
    batch_size: int = _f(12, ge(1))     # per device; paper: 12 per GPU, 192 total
    gradient_accumulation_steps: int = _f(1, ge(1))
    adam_beta1: float = _f(0.9, between(0, 1, hi_open=True))  # released code: AdamW defaults
    adam_beta2: float = _f(0.999, between(0, 1, hi_open=True))
    adam_weight_decay: float = _f(1e-2, ge(0))
    adam_epsilon: float = _f(1e-8, gt(0))
    lr_warmup_steps: int = _f(0, ge(0))  # released code: constant lr
    max_grad_norm: float = _f(1.0, gt(0))
    # min-SNR loss weighting (diffusers' --snr_gamma); paper: plain MSE
    snr_gamma: float | None = _f(None, gt(0))
    # no | fp16 | bf16; None: the launcher's (`accelerate launch --mixed_precision`), else fp32 as
    # released. Frozen parts run in it; trainable parameters and checkpoints stay fp32.
    mixed_precision: str | None = _f(None, one_of(MIXED_PRECISION))
    report_to: str = _f("tensorboard", one_of(TRACKERS))  # tensorboard | wandb | none (accelerate trackers)
    gradient_checkpointing: bool = False
    p_uncond: float = _f(0.1, between(0, 1))  # drop every level: trains the CFG branch
    p_prefix: float = _f(0.1, between(0, 1))  # cut to a shorter lineage: trains TaxaGuide's reference
    # 0: off; EMA of trainable weights, used for sampling
    ema_decay: float = _f(0.0, between(0, 1, hi_open=True))
    seed: int = _f(42, SEED)
    checkpoint_every: int = _f(5000, ge(0))
    keep_checkpoints: int = _f(2, ge(0))  # step checkpoints kept per stage (stage ends always kept)
    validate_every: int = _f(5000, ge(0))
    validation_seeds: int = _f(4, ge(0))  # images per row of the validation grid (0: no grids)
    fixed_batch: int = _f(64, ge(0))    # held-out-noise batch whose loss is logged per stage (0: off)
    log_every: int = _f(50, ge(1))
    output_dir: str = "runs"

    def check(self, p: str) -> None:
        # one draw decides: uncond with p_uncond, else a prefix with p_prefix
        _require(self.p_uncond + self.p_prefix <= 1, [p + "p_uncond", p + "p_prefix"],
                 f"{p}p_uncond + {p}p_prefix = {self.p_uncond} + {self.p_prefix}; expected <= 1")


@dataclass
class SampleConfig(_Checked):
    SECTION: ClassVar[str] = "sample"
    guidance: str = _f("taxa", one_of(GUIDANCE))  # taxa | cfg | none
    scale: float = 6.0                  # paper Sec. A.1: 6 (diffusers convention, s = 1 + w)
    guide_level: int = _f(0, ge(0))     # TaxaGuide reference level (paper: 0)
    steps: int = _f(250, ge(1))         # paper Sec. A.1: 250
    scheduler: str = _f("ddpm", one_of(SCHEDULERS))  # see pipeline.SCHEDULERS
    guidance_start: float = _f(0.0, between(0, 1))  # fraction of the trajectory where guidance starts
    guidance_stop: float = _f(1.0, between(0, 1))
    batch_size: int = _f(16, ge(1))

    def check(self, p: str) -> None:
        _require(self.guidance_start <= self.guidance_stop, [p + "guidance_start", p + "guidance_stop"],
                 f"{p}guidance_start {self.guidance_start} is after {p}guidance_stop {self.guidance_stop}")


@dataclass
class EvalConfig(_Checked):
    SECTION: ClassVar[str] = "eval"
    n_per_taxon: int = _f(50, ge(1))    # paper Table S2: 15-50 images per species
    levels: list[str] | None = _f(None, distinct())  # None: every level
    fid_weights: str | None = None      # FID Inception weights (.pth); None: torch-fidelity's cache
    bioclip: str = "hf-hub:imageomics/bioclip"
    lpips_net: str = _f("alex", one_of(("alex", "vgg", "squeeze")))


@dataclass
class Config(_Checked):
    name: str = _f("run", RUN_NAME)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return asdict(self)


# -- types, dicts and files -------------------------------------------------------------------------
def _type_name(tp: Any, number_only: bool = False) -> str:
    """"int", "float or None"; number_only: "int " or "float " before a rule's words, else ""."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    if number_only:
        return f"{args[0].__name__} " if args[0] in (int, float) else ""
    none = ["None"] if type(None) in typing.get_args(tp) else []
    return " or ".join([getattr(a, "__name__", str(a)) for a in args] + none)


def _coerce(tp: Any, value: Any, key: str, rule: Rule | None = None) -> Any:
    """Check `value` against the annotated type `tp`; ints are accepted for floats, NaN and inf never."""
    allowed = f" (allowed: {rule.words()})" if rule else ""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                try:
                    return _coerce(a, value, key, rule)
                except TypeError:
                    pass
        raise _err(TypeError, key, f"{key}: expected {_type_name(tp)}, got {value!r}{allowed}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise _err(TypeError, key, f"{key}: expected a list, got {value!r}{allowed}")
        return [_coerce(inner, v, key) for v in value]
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads `1e-2` (no dot) as a string; float() reads it as everyone means it
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):  # NaN weights, black images, `NaN` in JSON
            raise _err(ValueError, key, f"{key}: {value!r} is not allowed; expected a finite float"
                                        + (f" {rule.words()}" if rule else ""))
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # `train.stages=0` or `name=2024`: YAML read a number, the field is text
    raise _err(TypeError, key, f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}{allowed}")


def from_dict(d: dict, cls: type = Config, prefix: str | None = None) -> Any:
    """Build a dataclass from nested dicts; unknown keys are errors that name the key.
    `prefix`: how errors name the fields (default: the section's, "train.")."""
    prefix = prefix if prefix is not None else (cls.SECTION + "." if cls.SECTION else "")
    if not isinstance(d, dict):
        raise _err(TypeError, prefix.rstrip(".") or "config",
                   f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise _err(KeyError, [prefix + str(k) for k in unknown],
                   f"unknown config key(s) {', '.join(prefix + str(k) for k in unknown)}; "
                   f"known under {prefix or 'top level'}: {', '.join(sorted(known))}")
    kw = {k: from_dict({} if v is None else v, hints[k], f"{prefix}{k}.") if dataclasses.is_dataclass(hints[k]) else v
          for k, v in d.items()}
    token = _PREFIX.set(prefix)  # __post_init__ checks the values and names them with `prefix`
    try:
        return cls(**kw)
    finally:
        _PREFIX.reset(token)


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


def _yaml(text: str, where: str) -> Any:
    """yaml.safe_load with a one-line ValueError naming `where` and the line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        why = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ValueError(f"{where}: not valid YAML{at}: {why}") from None


def apply_overrides(d: dict, overrides: Sequence[str]) -> dict:
    """`section.key=value` (value parsed as YAML) into the nested dict `d`, in place."""
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"override {o!r} is not key=value (e.g. train.batch_size=8)")
        key, val = o.split("=", 1)
        node = d
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if node.get(p) is None:  # absent, or `train:` left empty in the file
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise KeyError(f"override {o!r}: {p} is not a section")
        node[parts[-1]] = _yaml(val, f"override {o!r}") if val.strip() else None
    return d


def _dotted(d: Any, prefix: str = "") -> set[str]:
    """Every dotted key of a nested dict: {"train", "train.lr", ...}."""
    if not isinstance(d, dict):
        return set()
    return set().union(*({prefix + str(k)} | _dotted(v, f"{prefix}{k}.") for k, v in d.items()))


def _in_file(e: Exception, src: Path) -> Exception:
    """`e` with " (in FILE)" appended, same type and keys."""
    msg = e.args[0] if e.args else str(e)
    return _err(type(e), getattr(e, "config_keys", ()), f"{msg} (in {src})")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    src = resolve_preset(path) if path else None
    d = (_yaml(src.read_text(), str(src)) if src else None) or {}
    if not isinstance(d, dict):
        raise TypeError(f"{src}: expected a mapping of config sections, got {type(d).__name__}")
    from_file = _dotted(d)
    d = apply_overrides(d, overrides)
    given = {o.split("=", 1)[0].strip() for o in overrides}
    try:
        return from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        # a value the file set (not an override of it): say which file, it may be a preset
        if src and any(k in from_file and k not in given for k in getattr(e, "config_keys", ())):
            raise _in_file(e, src) from None
        raise


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_file(path: str | Path) -> Config:
    """A resolved config written by `save_config` (YAML) or stored as JSON in a checkpoint."""
    p = Path(path)
    d = _yaml(p.read_text(), str(p))  # JSON is YAML
    try:
        return from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise _in_file(e, p) from None
