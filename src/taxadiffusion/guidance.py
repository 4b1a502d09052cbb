"""Guidance as pure tensor functions (paper Sec. 3.4), in the diffusers convention.

Both are `ref + scale * (cond - ref)`; they differ in what the reference is:
- cfg: the unconditional (null-context) prediction (Ho & Salimans 2022).
- taxaguide: the prediction for a higher taxonomic level of the same lineage, level 0 in the paper:
  eps = eps(c0) + s * (eps(c<=k) - eps(c0)).

Scale conventions. The paper writes (1 + w) * eps_c - w * eps_ref; that equals the diffusers form
with s = 1 + w (`paper_w_to_scale`). s = 1 (w = 0) returns the conditional prediction unchanged,
s = 0 returns the reference. The paper's "scale 6" (Sec. A.1, Fig. S5) is read here as s = 6; the
released code passes its value to a diffusers-style formula too (REFERENCE-FACTS.md), so s = 6 is
the number to use when reproducing it.
"""
from __future__ import annotations

import torch


def cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps_uncond + scale * (eps_cond - eps_uncond)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def taxaguide(eps_ref: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """TaxaGuide: eps_ref + scale * (eps_cond - eps_ref), eps_ref from an ancestor level's context."""
    return eps_ref + scale * (eps_cond - eps_ref)


def paper_w_to_scale(w: float) -> float:
    """(1 + w) eps_c - w eps_ref  ==  ref + s (cond - ref)  with  s = 1 + w."""
    return 1.0 + w


def paper_form(eps_ref: torch.Tensor, eps_cond: torch.Tensor, w: float) -> torch.Tensor:
    """The paper's Eq. for TaxaGuide, written as printed: (1 + w) eps_c - w eps_ref."""
    return (1.0 + w) * eps_cond - w * eps_ref


def in_interval(step: int, num_steps: int, interval: tuple[float, float]) -> bool:
    """Whether guidance applies at `step` (0-based) of `num_steps`, for an interval given as
    fractions of the trajectory from pure noise (0.0) to the end (1.0), e.g. (0.0, 0.5) guides the
    first half (the released code's `range_guidance`, Kynkaanniemi et al. 2024)."""
    start, stop = interval
    if not 0.0 <= start <= stop <= 1.0:
        raise ValueError(f"guidance interval must satisfy 0 <= start <= stop <= 1, got {interval}")
    frac = step / max(num_steps, 1)
    return start <= frac < stop or (stop == 1.0 and frac >= start)


GUIDANCE = {"cfg": cfg, "taxa": taxaguide}  # name -> combination rule; "none" skips the reference
