"""Per-level cross-attention maps: where each rank's condition acts on the image (paper Fig. S6).

Definition (an exact split, not a heuristic). The context is a sum over levels, c = sum_l c_l with
c_l = enc_l(E_l) (conditioning.TaxonomyConditioner, paper Eq. 3). In a cross-attention layer (attn2)
the values are linear in the context (to_v, with or without LoRA), V = sum_l V_l + v0 with
V_l = to_v(c_l) - v0 and v0 = to_v(0) (the bias; 0 in SD v1.5 and our tiny UNets), so the attention
output before its output projection splits exactly:

    O = A V = sum_l A V_l + v0,    A = softmax(Q K^T / sqrt(d)) from the FULL context.

Level l's contribution at pixel p in one layer is ||(A V_l)[p]||_2 over all heads and channels: the
norm of its share of the output, as in norm-based attention analysis (Kobayashi et al., "Attention is
Not Only a Weight", EMNLP 2020, who show ||a f(x)|| reads better than the weight a alone). The weights
A are shared: a level acts on a pixel through the values it brings there, under the attention
pattern of the whole condition. The bias part v0 is the same at every pixel and is in no level's map.

Averaging (as DAAM, Tang et al. ACL 2023, aggregates cross-attention over layers and steps). For each
layer call, every level's (h, w) map is upsampled bilinearly to the image size and divided by the
mean over pixels of its sum over levels, so every layer and step weighs the same whatever its width
or resolution, and the levels keep their relative size. `maps` is the mean of that over every
cross-attention layer and every recorded denoising step (default the whole trajectory; `window`
takes fractions of it as guidance_interval does). Hence, for each image, maps.sum(levels) has mean 1
over pixels, and maps[l].mean() is level l's share of the contribution (`shares`). For display each
level's map is divided by its own maximum, so 0 stays "no contribution" (`display`).

Only the conditional half of the UNet's batch is recorded: under guidance the pipeline runs the
reference first and the condition second (pipeline.__call__); without guidance the batch is the
condition alone.

Implementation: `LevelAttnProcessor` wraps the layer's own processor (diffusers' AttnProcessor2_0 by
default) and returns its output untouched, so the sampled image is bit-identical. The split is
computed on the side from the same modules, as AttnProcessor2_0 computes query, key and value, and
checked against that output: to_out(sum_l A V_l + v0) must reproduce it (`max_sum_error`, relative).
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..conditioning import taxon_embeddings
from ..guidance import in_interval
from ..imaging import labelled_grid, save_pngs
from ..sampling import load_for_sampling, slug
from ..taxonomy import Taxon
from . import output_folder, publish, sample_settings
from .traits import level_label, short_label

REPORT_ORDER = 65


def level_parts(attn, hidden_states: torch.Tensor, context: torch.Tensor, level_ctx: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(parts (L, B, N, inner): A V_l per level, v0 (inner,): the value bias) for one attn2 layer.

    `hidden_states` (B, N, C) or (B, C, H, W); `context` (B, 77, D) the layer's actual context (the
    weights A come from it); `level_ctx` (L, 77, D) its per-level terms, the same for every row.
    Query, key and value as diffusers' AttnProcessor2_0 (0.42) computes them.
    """
    for name in ("spatial_norm", "norm_cross", "norm_q", "norm_k"):
        if getattr(attn, name, None) not in (None, False):
            raise ValueError(f"per-level attention maps do not support attention layers with {name}")
    if attention_mask is not None:
        raise ValueError("per-level attention maps do not support an attention mask")
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    B, N = hidden_states.shape[:2]
    L = level_ctx.shape[0]
    query = attn.to_q(hidden_states)
    key = attn.to_k(context)
    inner = key.shape[-1]
    heads, d = attn.heads, inner // attn.heads
    q = query.view(B, N, heads, d).transpose(1, 2)
    k = key.view(B, -1, heads, d).transpose(1, 2)
    # attn.scale is dim_head ** -0.5, SDPA's default scaling in AttnProcessor2_0
    weights = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1)  # (B, heads, N, 77)
    v0 = attn.to_v(torch.zeros_like(level_ctx[:1, :1]))[0, 0]
    values = attn.to_v(level_ctx) - v0  # (L, 77, inner)
    v = values.view(L, -1, heads, d).transpose(1, 2)  # (L, heads, 77, d)
    parts = torch.einsum("bhnk,lhkd->lbnhd", weights, v).reshape(L, B, N, inner)
    return parts, v0


def level_sum(level_ctx: torch.Tensor) -> torch.Tensor:
    """The context as TaxonomyConditioner.forward sums it (zeros + level 0 + level 1 + ...)."""
    out = level_ctx.new_zeros(level_ctx.shape[1:])
    for c in level_ctx:
        out = out + c
    return out


def recompose(attn, parts: torch.Tensor, v0: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
    """The layer's output rebuilt from its per-level parts (B, N, C), as AttnProcessor2_0 ends."""
    out = attn.to_out[1](attn.to_out[0](parts.sum(0) + v0))
    if attn.residual_connection:
        res = hidden_states if hidden_states.ndim == 3 else hidden_states.flatten(2).transpose(1, 2)
        out = out + res
    return out / attn.rescale_output_factor


@dataclass
class LevelRecorder:
    """Accumulates per-level maps over layers and steps (see the module docstring)."""

    level_ctx: torch.Tensor                # (L, 77, D) on the UNet's device and dtype
    n: int                                 # images in the batch: the conditional rows are the last n
    size: tuple[int, int]                  # image (H, W)
    num_steps: int
    window: tuple[float, float] = (0.0, 1.0)
    step: int = 0
    calls: int = 0                         # layer calls averaged (layers x recorded steps)
    max_sum_error: float = 0.0             # max |recomposed - actual| / max |actual| over calls
    total: torch.Tensor | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return in_interval(self.step, self.num_steps, self.window)

    def callback(self, pipe, i, t, tensors) -> dict:
        """callback_on_step_end: the pipeline finished step i."""
        self.step = i + 1
        return tensors

    @torch.no_grad()
    def record(self, attn, hidden_states, context, out) -> None:
        n = self.n
        if context.shape[0] not in (n, 2 * n):
            raise RuntimeError(f"cross-attention batch {context.shape[0]} is neither {n} images nor "
                               f"{n} references + {n} conditions")
        hs, ctx = hidden_states[-n:], context[-n:]
        full = level_sum(self.level_ctx)
        tol = (1e-5 if full.dtype == torch.float32 else 1e-2) * (1 + full.abs().max().item())
        if (ctx - full).abs().max().item() > tol:
            raise RuntimeError("the conditional context of the UNet call is not the sum of the "
                               "recorded level contexts: the recorder was set up for another taxon")
        parts, v0 = level_parts(attn, hs, ctx, self.level_ctx)
        actual = out[-n:] if out.ndim == 3 else out[-n:].flatten(2).transpose(1, 2)
        err = (recompose(attn, parts, v0, hs) - actual).abs().max() / actual.abs().max().clamp_min(1e-12)
        self.max_sum_error = max(self.max_sum_error, err.item())
        L, _, N, _ = parts.shape
        H, W = self.size
        h = round(math.sqrt(N * H / W))
        w = N // max(h, 1)
        if h * w != N:
            raise RuntimeError(f"cannot lay {N} attention queries out on a {H}x{W} image")
        norms = parts.float().norm(dim=-1).reshape(L * n, 1, h, w)
        maps = F.interpolate(norms, size=(H, W), mode="bilinear", align_corners=False)
        maps = maps.reshape(L, n, H, W).transpose(0, 1)  # (n, L, H, W)
        maps = maps / maps.sum(1).mean((-1, -2)).clamp_min(1e-12)[:, None, None, None]
        self.total = maps if self.total is None else self.total + maps
        self.calls += 1

    def maps(self) -> torch.Tensor:
        if not self.calls:
            raise ValueError(f"no cross-attention call was recorded (steps window {self.window} of "
                             f"{self.num_steps} steps)")
        return (self.total / self.calls).cpu()


class LevelAttnProcessor:
    """Wraps an attention processor: its output unchanged, per-level maps recorded on the side."""

    def __init__(self, inner, recorder: LevelRecorder):
        self.inner, self.recorder = inner, recorder

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if encoder_hidden_states is not None and self.recorder.active:
            if attention_mask is not None:
                raise ValueError("per-level attention maps do not support an attention mask")
            self.recorder.record(attn, hidden_states, encoder_hidden_states, out)
        return out


@contextmanager
def recording(unet, recorder: LevelRecorder):
    """Install LevelAttnProcessor on every cross-attention layer (attn2) only; restore on exit."""
    old = unet.attn_processors
    keys = [k for k in old if k.endswith("attn2.processor")]
    if not keys:
        raise ValueError("this UNet has no cross-attention layers (attn2)")
    unet.set_attn_processor({k: LevelAttnProcessor(v, recorder) if k in keys else v
                             for k, v in old.items()})
    try:
        yield recorder
    finally:
        unet.set_attn_processor(dict(old))  # set_attn_processor pops from the dict it is given


def level_contexts(pipe, names: Sequence[str]) -> torch.Tensor:
    """(L, 77, D): each level's encoder output for a lineage, summing to pipe.context(names)."""
    if pipe.conditioner is None:
        raise ValueError("per-level maps need a TaxonomyConditioner; this pipeline is a flat "
                         "text baseline (its context is one prompt)")
    tax = pipe.taxonomy
    lvl = len(names) - 1
    emb = taxon_embeddings(pipe.text_cache, tax, Taxon(lvl, tuple(names), tax.ranks[lvl]), names)
    emb = emb.to(pipe.device, pipe.conditioner.dtype)
    with torch.no_grad():
        ctx = torch.stack([pipe.conditioner.encode_level(l, emb[None, l])[0] for l in range(len(names))])
    return ctx.to(pipe.unet.dtype)


def image_size(pipe) -> tuple[int, int]:
    s = pipe.unet.config.sample_size
    f = 1 if pipe.vae is None else 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return s * f, s * f


@dataclass
class AttentionMaps:
    images: torch.Tensor      # (n, 3, H, W) uint8
    maps: torch.Tensor        # (n, L, H, W) float32; maps.sum(1).mean((-1, -2)) == 1 per image
    labels: list[str]         # one per level
    calls: int                # layer calls averaged (layers x recorded steps)
    max_sum_error: float      # relative; the split reproduces each layer's output to this

    def shares(self) -> torch.Tensor:
        """(n, L): each level's share of the contribution, summing to 1 per image."""
        return self.maps.mean((-1, -2))

    def display(self) -> torch.Tensor:
        """(n, L, H, W) in [0, 1]: each map divided by its own maximum (an all-zero map stays 0)."""
        peak = self.maps.amax((-1, -2), keepdim=True)
        return torch.where(peak > 0, self.maps / peak.clamp_min(1e-12), torch.zeros_like(self.maps))


def attention_maps(pipe, taxon: str, n: int = 2, seed: int = 0,
                   window: tuple[float, float] = (0.0, 1.0), **sample_kw) -> AttentionMaps:
    """Sample `n` images of `taxon` and record each level's cross-attention contribution."""
    names = pipe.resolve_taxon(taxon, sample_kw.pop("level", None))
    rec = LevelRecorder(level_contexts(pipe, names), n, image_size(pipe),
                        sample_kw.get("num_inference_steps", 50), tuple(window))
    kw = {"progress": False, **sample_kw, "output_type": "uint8", "batch_size": n}
    with recording(pipe.unet, rec):
        images = pipe(" > ".join(names), num_images=n, seed=seed, callback_on_step_end=rec.callback,
                      **kw).images
    ranks = pipe.taxonomy.ranks
    return AttentionMaps(images, rec.maps(), [level_label(ranks, names[: l + 1]) for l in range(len(names))],
                         rec.calls, rec.max_sum_error)


def overlay(image: torch.Tensor, heat: torch.Tensor, alpha: float = 0.5, cmap: str = "jet") -> torch.Tensor:
    """uint8 (3, H, W): `heat` in [0, 1] through a matplotlib colormap, blended over `image`."""
    import matplotlib
    colours = torch.from_numpy(matplotlib.colormaps[cmap](heat.clamp(0, 1).numpy())[..., :3])
    colours = colours.permute(2, 0, 1).float() * 255
    return (image.float() * (1 - alpha) + colours * alpha).round().clamp(0, 255).to(torch.uint8)


def attention_command(a) -> list[Path]:
    """`taxadiffusion attention`: overlays per level (columns: image, level 0 ... k), maps + JSON."""
    pipe, sc = load_for_sampling(a.run, a.scheduler, a.device)
    kw = sample_settings(a, sc)
    window = tuple(float(x) for x in a.window.split(","))
    if len(window) != 2:
        raise ValueError(f"--window must be start,stop fractions, got {a.window!r}")
    names = pipe.resolve_taxon(a.taxon)
    ranks = pipe.taxonomy.ranks
    folder, run_dir = output_folder(a.run, "attention", a.out)
    folder = folder / slug(" ".join(names[-2:]))
    res = attention_maps(pipe, a.taxon, a.n, a.seed, window, **kw)
    shown = res.display()
    share = res.shares().mean(0)
    rows, panels = [], folder / "panels"
    for i, img in enumerate(res.images):
        over = torch.stack([overlay(img, shown[i, l]) for l in range(len(names))])
        rows.append(torch.cat([img[None], over]))
        save_pngs(rows[-1], [f"seed{a.seed}-{i:04d}-image"] + [
            f"seed{a.seed}-{i:04d}-level{l}-{ranks[l]}" for l in range(len(names))], panels)
    cols = ["image"] + [f"{short_label(ranks, names[: l + 1])} {100 * share[l]:.0f}%"
                        for l in range(len(names))]
    grid = folder / f"attention-seed{a.seed}.png"
    size = res.images.shape[-1]
    labelled_grid(rows, [f"seed {a.seed} #{i}" for i in range(a.n)], cols,
                  cell=max(96, min(size, 256))).save(grid)
    from safetensors.torch import save_file
    save_file({"maps": res.maps.contiguous(), "images": res.images.contiguous()},
              folder / f"maps-seed{a.seed}.safetensors",
              metadata={"levels": json.dumps(res.labels)})
    summary = {"run": str(a.run), "taxon": " > ".join(names), "n": a.n, "seed": a.seed,
               "window": list(window), "scheduler": type(pipe.scheduler).__name__, **kw,
               "levels": res.labels, "share_mean": share.tolist(),
               "share_per_image": res.shares().tolist(), "layer_calls": res.calls,
               "max_sum_error": res.max_sum_error,
               "definition": "level l at pixel p: ||(A V_l)[p]||, A from the full context; per layer "
                             "call upsampled and divided by the pixel-mean of the level sum; mean over "
                             "attn2 layers and steps (analysis/attention.py)"}
    (folder / f"attention-seed{a.seed}.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {grid}; level shares " +
          ", ".join(f"{lab} {100 * s:.1f}%" for lab, s in zip(res.labels, share.tolist())))
    if run_dir is not None:
        from ..report import rel
        publish(run_dir, f"attention-{slug(' '.join(names))}", f"Attention per level: {res.labels[-1]}", [
            {"text": "Where each rank's condition acts: level l's map is the norm of its share "
             "A V_l of every cross-attention output (the context is the sum of the levels, so the "
             "output splits exactly), averaged over layers and denoising steps "
             f"(window {window[0]:g}-{window[1]:g} of the trajectory). Each map is shown divided by "
             "its own maximum; the percentage is the level's share of the total contribution."},
            {"image": rel(run_dir, grid), "caption": "Columns: the generated image, then levels "
             + ", ".join(res.labels) + "."},
            {"table": {"columns": ["level", "share of contribution"],
                       "rows": [[lab, float(s)] for lab, s in zip(res.labels, share.tolist())]},
             "caption": f"Mean over {a.n} images; split checked to a relative error of "
             f"{res.max_sum_error:.1e}."}], order=REPORT_ORDER)
    return [grid]
