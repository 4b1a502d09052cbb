"""The samplers by name, each built over the training noise schedule (one schedule, DESIGN.md)."""
from __future__ import annotations

from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, PNDMScheduler,
                       UniPCMultistepScheduler)

SCHEDULERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,     # DPM-Solver++(2M), diffusers' default algorithm
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "pndm": PNDMScheduler,                    # SD v1.5's default (the released code's sampler)
    "unipc": UniPCMultistepScheduler,
}
# SD v1.5's scheduler settings where they differ from a class's defaults (its scheduler_config.json)
SCHEDULER_SETTINGS = {"pndm": {"skip_prk_steps": True, "set_alpha_to_one": False},
                      "ddim": {"set_alpha_to_one": False}}


def make_scheduler(name: str, config) -> object:
    """A sampler over the training noise schedule `config` (the one schedule, DESIGN.md)."""
    if name not in SCHEDULERS:
        raise KeyError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(config, **SCHEDULER_SETTINGS.get(name, {}))
