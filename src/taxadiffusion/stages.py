"""The stage plan: which parameters train in each stage, at which learning rate, on which levels.

Strategies (paper Sec. 3.3 and Table 4; baselines of Table 1):
- progressive: stage 0 trains LoRA and level 0's encoder at lr 1e-4; stage k >= 1 trains level k's
  encoder alone at lr 1e-5; the UNet, LoRA and earlier levels are frozen and in eval mode (the
  released code leaves earlier levels in train mode, dropout on: REFERENCE-FACTS.md).
- all: LoRA and every level jointly, context = sum of all levels.
- random: LoRA and every level; each step uses levels 0..k for one random k.
- lora-text: SD + LoRA, the lineage as one plain text prompt through the frozen text encoder.
- full: SD with every UNet weight trained (lr 1e-5), lineage as plain text.
Single-stage strategies get the same total budget as progressive (steps_stage0 + (L-1) steps_per_stage)
so ablations compare at a fixed compute budget.
A from-scratch (tiny) UNet has no pretrained base to adapt: with `train.train_unet_stage0` its stage 0
(and the single stage of all/random/lora-text) trains the whole UNet instead of LoRA.
`train.unet_every_stage` (not the paper) keeps what stage 0 trains in the UNet (LoRA, or the whole UNet)
training in every progressive stage, beside level k: a tiny base is too weak a reader of its context
for levels in front of a frozen UNet to change the samples (README, "What a 5-minute CPU training run
can and cannot show"). The null and shorter-prefix branches then train again (p_uncond, p_prefix),
since the UNet they run through changes. `train.train_earlier_levels` (not the paper) also keeps
levels 0..k-1 training in stage k: the curriculum without the freezing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .backbone import base_parameters, lora_parameters
from .config import TrainConfig

STRATEGIES = ("progressive", "all", "random", "lora-text", "full")


@dataclass(frozen=True)
class Stage:
    index: int
    name: str                   # e.g. "stage-2-family"; checkpoint folder name
    level: int                  # deepest level in the context (random: the maximum)
    data_level: int             # records must have this level to be trained on in this stage
    steps: int
    lr: float
    train_levels: tuple[int, ...] = ()   # level encoders that train
    train_lora: bool = False
    train_unet: bool = False             # every base UNet weight
    random_level: bool = False           # random: k drawn per step
    text_prompt: bool = False            # lora-text / full: lineage text, no conditioner
    p_uncond: float = 0.0
    p_prefix: float = 0.0
    notes: tuple[str, ...] = field(default_factory=tuple)


def plan_stages(cfg: TrainConfig, ranks: tuple[str, ...]) -> list[Stage]:
    L = len(ranks)
    s0 = cfg.steps_stage0 or cfg.steps_per_stage
    total = s0 + (L - 1) * cfg.steps_per_stage
    unet0 = cfg.train_unet_stage0
    if cfg.strategy == "progressive":
        stages = [Stage(0, f"stage-0-{ranks[0]}", 0, 0, s0, cfg.lr_stage0, (0,), not unet0, unet0,
                        p_uncond=cfg.p_uncond, p_prefix=0.0,
                        notes=("level 0 has no shorter prefix: p_prefix does not apply",))]
        every = cfg.unet_every_stage
        for k in range(1, L):
            # Frozen UNet (the paper): every shorter context (null, level 0, parent) is made of frozen
            # parameters, so dropping to it would train nothing; those branches were trained earlier.
            # A UNet that trains in every stage changes all of them, and with train_earlier_levels the
            # prefixes train those levels: then their dropout stays on.
            stages.append(Stage(k, f"stage-{k}-{ranks[k]}", k, k, cfg.steps_per_stage, cfg.lr,
                                tuple(range(k + 1)) if cfg.train_earlier_levels else (k,),
                                every and not unet0, every and unet0,
                                p_uncond=cfg.p_uncond if every else 0.0,
                                p_prefix=cfg.p_prefix if every or cfg.train_earlier_levels else 0.0,
                                notes=("the UNet trains in every stage (train.unet_every_stage)",) if every
                                else ("p_uncond is 0: the null branch is frozen",)))
        return stages
    if cfg.strategy in ("all", "random"):
        # records missing lower ranks (missing_ranks=keep) still train the levels they have
        return [Stage(0, f"stage-0-{cfg.strategy}", L - 1, 0, total, cfg.lr_stage0, tuple(range(L)),
                      not unet0, unet0, random_level=cfg.strategy == "random",
                      p_uncond=cfg.p_uncond, p_prefix=cfg.p_prefix)]
    if cfg.strategy == "lora-text":
        return [Stage(0, "stage-0-lora-text", L - 1, 0, total, cfg.lr_stage0, (), not unet0, unet0,
                      text_prompt=True, p_uncond=cfg.p_uncond)]
    if cfg.strategy == "full":
        return [Stage(0, "stage-0-full", L - 1, 0, total, cfg.lr, (), False, True,
                      text_prompt=True, p_uncond=cfg.p_uncond)]
    raise ValueError(f"train.strategy must be one of {STRATEGIES}, got {cfg.strategy!r}")


def select_stages(plan: list[Stage], which: str) -> list[Stage]:
    """'all', one index ('2'), or a comma list ('0,1')."""
    if which == "all":
        return plan
    try:
        idx = [int(x) for x in str(which).split(",")]
    except ValueError:
        raise ValueError(f"train.stages must be 'all' or stage indices like 0,1; got {which!r}")
    bad = [i for i in idx if not 0 <= i < len(plan)]
    if bad:
        raise ValueError(f"stage(s) {bad} do not exist; this plan has {len(plan)} stages")
    return [plan[i] for i in idx]


def apply_stage(stage: Stage, unet: nn.Module, conditioner: nn.Module | None) -> list[nn.Parameter]:
    """Set requires_grad and train/eval modes for `stage`; return the trainable parameters.

    Frozen modules go to eval mode (dropout off), so their outputs are a fixed function.
    """
    unet.requires_grad_(False)
    for p in lora_parameters(unet):
        p.requires_grad_(stage.train_lora)
    if stage.train_unet:
        for p in base_parameters(unet):
            p.requires_grad_(True)
    unet.train(stage.train_lora or stage.train_unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    if conditioner is not None:
        conditioner.requires_grad_(False).eval()
        for l in stage.train_levels:
            conditioner.levels[l].requires_grad_(True).train()
            params += list(conditioner.levels[l].parameters())
    if not params:
        raise ValueError(f"{stage.name} trains nothing")
    return params
