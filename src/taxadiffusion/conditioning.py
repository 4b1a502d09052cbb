"""The taxonomy condition: cached text embeddings, per-level encoders, their sum, level dropout.

Paper Sec. 3.2: each rank's prompt "<rank>: <name>" goes through the frozen CLIP text encoder
(77 x 768); a per-level module of 2 transformer encoder layers refines it; levels 0..k are summed and
used as the UNet's cross-attention context.

What we do differently from the released code (REFERENCE-FACTS.md), and why:
- The text encoder runs once per unique prompt (`TextEmbeddingCache`, in memory and on disk), not on
  every level prompt at every step.
- `zero_init`: the last LayerNorm of every level >= 1 starts with weight and bias 0, so a new level
  outputs exactly 0 and stage k starts from stage k-1's model; the released code adds a random level.
  (Post-norm layers end in that LayerNorm, so this adds no parameters: Table S1's counts still hold.)
- Level dropout truncates the lineage to a prefix, including the empty one (the null context), so the
  references of CFG (null), TaxaGuide (level 0) and parent guidance are all trained (`sample_keep`).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file, save_file
from torch import nn

from .taxonomy import Taxon, Taxonomy


def embedding_dtype(dim: int) -> torch.dtype:
    """The dtype text embeddings are stored in, the same in training and sampling, so a level sees
    at sampling exactly the numbers it was trained on: fp16 at CLIP-L width (one 77 x 768 table per
    prompt; iNat's ~13k prompts take 1.5 GB instead of 3), fp32 for the tiny encoders."""
    return torch.float16 if dim >= 512 else torch.float32


class TextEmbeddingCache:
    """Frozen text-encoder outputs (last hidden state, 77 x D) per prompt, in memory and on disk.

    The disk cache lives under `cache_dir/<identity>/` with one safetensors file per prompt named by
    the prompt's sha256; `identity` must change whenever the encoder's weights do
    (backbone.module_fingerprint), so a cache entry is never reused across encoders.
    """

    def __init__(self, text_encoder: nn.Module, tokenizer, identity: str,
                 cache_dir: str | Path | None = None, dtype: torch.dtype = torch.float32,
                 batch_size: int = 64):
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.identity, self.dtype, self.batch_size = identity, dtype, batch_size
        self.dir = Path(cache_dir) / identity if cache_dir else None
        self.memory: dict[str, torch.Tensor] = {}
        self.encoder_calls = 0  # prompts actually encoded (tests and benchmarks read this)

    def _file(self, prompt: str) -> Path:
        return self.dir / f"{hashlib.sha256(prompt.encode()).hexdigest()}.safetensors"

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        device = next(self.text_encoder.parameters()).device
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        self.encoder_calls += len(prompts)
        return self.text_encoder(ids)[0].to("cpu", self.dtype)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, 77, D) on the CPU, in `dtype`; each unique prompt is encoded at most once."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self.memory]
        if self.dir is not None:
            for p in list(todo):
                f = self._file(p)
                if f.exists():
                    self.memory[p] = load_file(f)["embedding"].to(self.dtype)
                    todo.remove(p)
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i:i + self.batch_size]
            emb = self._encode(chunk)
            for p, e in zip(chunk, emb):
                self.memory[p] = e.clone()
                if self.dir is not None:
                    self.dir.mkdir(parents=True, exist_ok=True)
                    # a name per process: ranks encoding the same prompt never share a temp file,
                    # and the replace is atomic, so no rank reads half a file
                    tmp = self._file(p).with_suffix(f".{os.getpid()}.tmp")
                    save_file({"embedding": e.contiguous()}, tmp, metadata={"prompt": p})
                    tmp.replace(self._file(p))
        return torch.stack([self.memory[p] for p in prompts])

    def level_tables(self, taxonomy: Taxonomy) -> list[torch.Tensor]:
        """One (n_taxa_at_level, 77, D) table per level, rows in vocabulary-id order."""
        return [self.encode([taxonomy.prompt(t) for t in taxonomy.vocab(l)])
                for l in range(taxonomy.num_levels)]


class LevelEncoder(nn.Module):
    """2 post-norm transformer encoder layers, as the released code's nn.TransformerEncoder
    (d 768, 8 heads, ff 2048, dropout 0.1 on SD v1.5; 11.03M parameters per level)."""

    def __init__(self, dim: int, num_layers: int, num_heads: int, ff_dim: int, dropout: float,
                 out_proj: bool = False):
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, num_heads, ff_dim, dropout, batch_first=True)
        # enable_nested_tensor off: no padding mask here, and it keeps train and eval maths identical
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        # not in the paper (adds dim*(dim+1) parameters): a Linear after the encoder, so that a zero
        # init starts at 0 through a full map (ControlNet's zero convolutions), not a per-channel gain
        self.proj = nn.Linear(dim, dim) if out_proj else None

    def zero_output(self) -> None:
        if self.proj is not None:
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
            return
        last = self.encoder.layers[-1].norm2
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def gain(self) -> float:
        """How strongly the level speaks: mean |gain| of the last LayerNorm, times the projection's
        RMS singular value (||W||_F / sqrt(dim)) when there is one."""
        g = self.encoder.layers[-1].norm2.weight.detach().abs().mean()
        if self.proj is not None:
            w = self.proj.weight.detach()
            g = g * w.norm() / w.shape[0] ** 0.5
        return float(g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.encoder(x)
        return y if self.proj is None else self.proj(y)


class TaxonomyConditioner(ModelMixin, ConfigMixin):
    """Per-level encoders over cached text embeddings, summed over the kept levels (paper Eq. 3).

    forward(embeds (B, L, 77, D), keep (B, L) bool, null (77, D)) -> context (B, 77, D). A sample
    with no kept level gets the null context: the raw text embedding of the empty prompt, which is
    what SD v1.5's classifier-free guidance was pretrained with.
    """

    @register_to_config
    def __init__(self, num_levels: int, dim: int, num_layers: int = 2, num_heads: int = 8,
                 ff_dim: int = 2048, dropout: float = 0.1, zero_init: bool = True,
                 out_proj: bool = False):
        super().__init__()
        # out_proj (levels >= 1 only; level 0 stays the paper's module): see LevelEncoder
        self.levels = nn.ModuleList(
            LevelEncoder(dim, num_layers, num_heads, ff_dim, dropout, out_proj and l > 0)
            for l in range(num_levels))
        if zero_init:
            for enc in self.levels[1:]:
                enc.zero_output()

    def forward(self, embeds: torch.Tensor, keep: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
        B, L = keep.shape
        out = embeds.new_zeros(B, *embeds.shape[2:])
        for l in range(L):
            k = keep[:, l]
            # a frozen level nobody keeps costs nothing (stage k never runs levels > k); a level that
            # trains always runs, so each of its parameters gets a gradient (zero when no sample
            # keeps it) on every rank: DDP reduces every trainable parameter at every step
            trains = torch.is_grad_enabled() and next(self.levels[l].parameters()).requires_grad
            if not k.any() and not trains:
                continue
            enc = self.levels[l](embeds[:, l])
            out = out + enc * k[:, None, None].to(enc.dtype)
        none = ~keep.any(dim=1)
        if none.any():
            out = torch.where(none[:, None, None], null.to(out.dtype).expand_as(out), out)
        return out

    def output_gains(self) -> list[float]:
        """Each level's LevelEncoder.gain(): how strongly it speaks into the context (its output is
        that gain times a unit-variance vector, plus a taxon-independent bias). A zero-init level
        whose gain stays near 0 through its stage adds nothing; logged per step."""
        return [enc.gain() for enc in self.levels]

    def encode_level(self, level: int, embeds: torch.Tensor) -> torch.Tensor:
        """One level's refined embedding (B, 77, D), e.g. for the embedding map (analysis/)."""
        return self.levels[level](embeds)


def sample_keep(available: torch.Tensor, k: int | torch.Tensor, p_uncond: float, p_prefix: float,
                generator: torch.Generator) -> torch.Tensor:
    """Level dropout: which levels each sample's context sums (B, L) bool.

    `available` (B, L) marks levels a record has; `k` (int or (B,) tensor) is the deepest level used.
    With probability p_uncond a sample keeps nothing (null context: trains CFG's branch); else with
    probability p_prefix it keeps a random shorter prefix 0..j, j < k (trains TaxaGuide's level-0
    reference and the parent reference); else levels 0..k. All randomness comes from `generator`, so
    a resumed run replays it exactly.
    """
    B, L = available.shape
    k = torch.as_tensor(k).expand(B).clone()
    u = torch.rand(B, generator=generator)
    j = torch.floor(torch.rand(B, generator=generator) * k.clamp(min=1)).long()  # uniform 0..k-1
    depth = torch.where(u < p_uncond, torch.full_like(k, -1),
                        torch.where((u < p_uncond + p_prefix) & (k > 0), j, k))
    keep = torch.arange(L)[None, :] <= depth[:, None]
    return keep & available


def gather_embeddings(tables: Sequence[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """(B, L, 77, D) from per-level tables and ids (B, L); ids of -1 (missing level) give zeros."""
    B, L = ids.shape
    out = tables[0].new_zeros(B, L, *tables[0].shape[1:])
    for l in range(L):
        ok = ids[:, l] >= 0
        if ok.any():
            out[ok, l] = tables[l][ids[ok, l]]
    return out


def taxon_embeddings(cache: TextEmbeddingCache, taxonomy: Taxonomy, taxon: Taxon,
                     names: Sequence[str] | None = None) -> torch.Tensor:
    """(taxon.level + 1, 77, D) prompts' embeddings for one lineage; `names` overrides the names
    (an unseen taxon: its own prompts go through the same encoder, see pipeline.resolve_taxon)."""
    if names is None:
        prompts = taxonomy.prompts(taxon)
    else:
        prompts = []
        for lvl, name in enumerate(names):
            t = Taxon(lvl, tuple(names[: lvl + 1]), taxonomy.ranks[lvl])
            prompts.append(taxonomy.prompt(t))
    return cache.encode(prompts)
