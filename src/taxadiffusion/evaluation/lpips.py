"""LPIPS fidelity and diversity per species, through the `lpips` package (AlexNet, v0.1; paper Sec. 4.2).

Weights: lpips ships its calibrated linear layers in the wheel (lpips/weights/v0.1/alex.pth); the
AlexNet trunk is torchvision's ImageNet checkpoint `alexnet-owt-7be5be79.pth`, which lpips would fetch
through torchvision's downloader. We never download: the trunk comes from a path given by the user or
torch hub's cache ($TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth), is checked by a strict load
into torchvision's AlexNet, and copied into lpips' (randomly initialised) trunk slices.

Definitions (stated again in every result):
- fidelity: mean LPIPS between each generated image of a species and up to K distinct real images of
  the same species, drawn at random with a per-species seed (lower = closer to the real images);
- diversity: mean LPIPS over pairs of generated images of the same species (all unordered pairs, or a
  seeded random subset of `max_pairs` of them; higher = more diverse).
Images (uint8) are resized to `resolution` x `resolution` (bilinear, antialiased; aspect not kept) and
scaled to [-1, 1], the range LPIPS expects.
"""
from __future__ import annotations

import itertools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import lpips as lpips_lib
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models import AlexNet_Weights

from ..taxonomy import Taxon
from .tables import taxon_seed
from .weights import file_identity, find_weights, provenance, torch_hub_checkpoints

ALEXNET_URL = AlexNet_Weights.IMAGENET1K_V1.url
ALEXNET_FILE = ALEXNET_URL.rsplit("/", 1)[-1]  # alexnet-owt-7be5be79.pth
LPIPS_LINEAR = Path(lpips_lib.__file__).parent / "weights" / "v0.1" / "alex.pth"
RESOLUTION = 256


@dataclass
class Lpips:
    """A loaded LPIPS(alex) network and what identifies it (trunk and linear-layer files)."""

    net: lpips_lib.LPIPS
    identity: dict[str, Any]
    device: torch.device


def alexnet_weights_path(weights: str | os.PathLike | None = None) -> Path:
    """The AlexNet trunk file: `weights` if given, else torch hub's cache; MissingWeightsError if absent."""
    cached = torch_hub_checkpoints() / ALEXNET_FILE
    candidates = [(Path(weights), "given with --alexnet-weights")] if weights else []
    candidates.append((cached, "torch hub cache: $TORCH_HOME/hub/checkpoints, TORCH_HOME defaults to "
                               "~/.cache/torch; where torchvision saves it"))
    return find_weights(
        f"LPIPS AlexNet trunk weights {ALEXNET_FILE}", candidates,
        f"on a machine with internet run `wget {ALEXNET_URL}` (or "
        f"`python -c 'import torchvision; torchvision.models.alexnet(weights=\"IMAGENET1K_V1\")'`) and "
        f"copy the file to {cached}, or pass its path: `--alexnet-weights /path/{ALEXNET_FILE}` "
        f"(taxadiffusion evaluate; in Python: load_lpips(alexnet_weights=...)).")


_LOADED: dict[tuple, Lpips] = {}


def load_lpips(alexnet_weights: str | os.PathLike | None = None,
               device: str | torch.device | None = None) -> Lpips:
    """LPIPS v0.1 with the AlexNet trunk from local weights and the wheel's linear layers (memoised)."""
    trunk = file_identity(alexnet_weights_path(alexnet_weights))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    key = (trunk["path"], trunk["sha256"], str(dev))
    if key not in _LOADED:
        tv = torchvision.models.alexnet(weights=None)
        try:  # strict: a wrong file fails here, naming itself
            tv.load_state_dict(torch.load(trunk["path"], map_location="cpu", weights_only=True))
        except Exception as e:
            raise ValueError(f"{trunk['path']}: not a torchvision AlexNet state dict "
                             f"(expected {ALEXNET_FILE}): {e}") from e
        with warnings.catch_warnings():  # torchvision's "pretrained is deprecated" from inside lpips
            warnings.simplefilter("ignore", UserWarning)
            net = lpips_lib.LPIPS(net="alex", version="0.1", pnet_rand=True, verbose=False)
        # lpips' slices hold torchvision's `features` modules under their original indices
        for piece in net.net.children():
            for idx, module in piece.named_children():
                module.load_state_dict(tv.features[int(idx)].state_dict())
        ident = {"alexnet": trunk, "lpips_linear": file_identity(LPIPS_LINEAR)}
        _LOADED[key] = Lpips(net.eval().to(dev), ident, dev)
    return _LOADED[key]


def _prep(x: torch.Tensor, resolution: int, what: str) -> torch.Tensor:
    if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
        got = f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{what}: expected a uint8 tensor (N, 3, H, W), got {got}")
    x = x.float()
    if tuple(x.shape[2:]) != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False,
                          antialias=True)
    return (x / 127.5 - 1.0).clamp(-1, 1)


def lpips_distance(model: Lpips, a: torch.Tensor, b: torch.Tensor, *, resolution: int = RESOLUTION,
                   batch_size: int = 32) -> torch.Tensor:
    """LPIPS between a[i] and b[i] for every i: a float tensor (N,). Inputs are uint8 (N, 3, H, W)."""
    if len(a) != len(b):
        raise ValueError(f"lpips_distance: {len(a)} images against {len(b)}")
    idx = torch.arange(len(a))
    return _pair_distance(model, a, idx, b, idx, resolution, batch_size)


def _pair_distance(model: Lpips, a: torch.Tensor, ia: torch.Tensor, b: torch.Tensor, ib: torch.Tensor,
                   resolution: int, batch_size: int) -> torch.Tensor:
    """LPIPS between a[ia[i]] and b[ib[i]]; pairs are gathered per batch, so K partners per image
    never copy the image set K times (50 x 5 pairs of 512 px images would be 200 MB)."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(ia), batch_size):
            x = _prep(a[ia[i:i + batch_size]], resolution, "a").to(model.device)
            y = _prep(b[ib[i:i + batch_size]], resolution, "b").to(model.device)
            out.append(model.net(x, y).flatten().float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def _summary(per: dict[Taxon, dict], skipped: list, kind: str, model: Lpips, settings: dict,
             definition: str) -> dict[str, Any]:
    means = [e["lpips"] for e in per.values()]
    n_pairs = sum(e["n_pairs"] for e in per.values())
    pooled = (sum(e["lpips"] * e["n_pairs"] for e in per.values()) / n_pairs) if n_pairs else None
    return {"kind": kind,
            "mean_over_species": sum(means) / len(means) if means else None,
            "mean_over_pairs": pooled, "n_species": len(per), "n_pairs": n_pairs,
            "n_skipped": len(skipped), "per_species": per, "skipped": skipped,
            "provenance": provenance(kind, "lpips", model.identity, settings,
                                     settings["resolution"], definition)}


def lpips_fidelity(model: Lpips, gen: Mapping[Taxon, torch.Tensor], real: Mapping[Taxon, torch.Tensor],
                   *, k: int = 5, seed: int = 0, resolution: int = RESOLUTION,
                   batch_size: int = 32) -> dict[str, Any]:
    """Fidelity LPIPS per species (see the module docstring); species without real images are skipped."""
    per: dict[Taxon, dict] = {}
    skipped: list[dict] = []
    for t in sorted(gen):
        g, r = gen[t], real.get(t)
        if r is None or len(r) == 0 or len(g) == 0:
            skipped.append({"taxon": t, "n_gen": len(g), "n_real": 0 if r is None else len(r),
                            "reason": "no real images of this species" if len(g) else "no generated images"})
            continue
        kk = min(k, len(r))
        gen_rng = torch.Generator().manual_seed(taxon_seed(seed, t))
        # each generated image gets its own kk distinct real partners
        partners = torch.stack([torch.randperm(len(r), generator=gen_rng)[:kk] for _ in range(len(g))])
        ia = torch.arange(len(g)).repeat_interleave(kk)
        d = _pair_distance(model, g, ia, r, partners.flatten(), resolution, batch_size)
        per[t] = {"lpips": float(d.mean()), "std": float(d.std()) if len(d) > 1 else 0.0,
                  "n_gen": len(g), "n_real": len(r), "k": kk, "n_pairs": len(d)}
    settings = {"k_real_per_generated": k, "seed": seed, "resolution": resolution, "net": "alex",
                "version": "0.1", "resize": "bilinear, antialiased, to a square", "range": "[-1, 1]"}
    definition = ("Fidelity LPIPS: for each species, every generated image against up to k distinct "
                  "real images of the same species (seeded random draw per species), averaged over "
                  "pairs; mean_over_species averages species equally. Lower is closer to real.")
    return _summary(per, skipped, "lpips_fidelity", model, settings, definition)


def lpips_diversity(model: Lpips, gen: Mapping[Taxon, torch.Tensor], *, max_pairs: int = 200,
                    seed: int = 0, resolution: int = RESOLUTION, batch_size: int = 32) -> dict[str, Any]:
    """Diversity LPIPS per species (see the module docstring); species with < 2 images are skipped."""
    per: dict[Taxon, dict] = {}
    skipped: list[dict] = []
    for t in sorted(gen):
        g = gen[t]
        if len(g) < 2:
            skipped.append({"taxon": t, "reason": "fewer than 2 generated images", "n_gen": len(g)})
            continue
        pairs = torch.tensor(list(itertools.combinations(range(len(g)), 2)))
        if len(pairs) > max_pairs:
            rng = torch.Generator().manual_seed(taxon_seed(seed, t))
            pairs = pairs[torch.randperm(len(pairs), generator=rng)[:max_pairs]]
        d = _pair_distance(model, g, pairs[:, 0], g, pairs[:, 1], resolution, batch_size)
        per[t] = {"lpips": float(d.mean()), "std": float(d.std()) if len(d) > 1 else 0.0,
                  "n_gen": len(g), "n_pairs": len(d)}
    settings = {"max_pairs_per_species": max_pairs, "seed": seed, "resolution": resolution, "net": "alex",
                "version": "0.1", "resize": "bilinear, antialiased, to a square", "range": "[-1, 1]"}
    definition = ("Diversity LPIPS: for each species, mean LPIPS over unordered pairs of its generated "
                  "images (all pairs, or a seeded random max_pairs of them); mean_over_species "
                  "averages species equally. Higher is more diverse.")
    return _summary(per, skipped, "lpips_diversity", model, settings, definition)
