"""The training data stream: which records each rank sees at each step, and the input cache.

The stream is a fixed function of (seed, step): epoch e is a permutation of the records drawn from
seed + e; micro-step s takes the global batch stream[s*B*W : (s+1)*B*W] and rank r its slice
[r*B : (r+1)*B] (B per-rank batch, W world size, r the GLOBAL rank: the released code used the local
rank, so every node saw the same quarter of the data). Resuming at step s replays the stream exactly.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .backbone import cache_root, module_fingerprint


class StreamSampler:
    """Yields, forever, the positions (into the stage's record list) of this rank's micro-batches."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int, start: int = 0):
        if n == 0:
            raise ValueError("no records to train on")
        self.n, self.B, self.rank, self.world, self.seed, self.step = n, batch_size, rank, world, seed, start
        self._perm: dict[int, torch.Tensor] = {}
        self.served = 0
        self.served_head: list[int] = []   # the first positions served (distributed tests read them)
        self._sha = hashlib.sha256()

    def perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm:
            self._perm = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(
                self.seed * 100_003 + epoch))}
        return self._perm[epoch]

    def batch(self, step: int) -> torch.Tensor:
        first = (step * self.world + self.rank) * self.B
        pos = torch.arange(first, first + self.B)
        out = torch.empty(self.B, dtype=torch.long)
        for e in pos.div(self.n, rounding_mode="floor").unique().tolist():
            m = pos // self.n == e
            out[m] = self.perm(e)[pos[m] % self.n]
        return out

    def epoch_of(self, step: int) -> int:
        return (step * self.world + self.rank) * self.B // self.n

    def __iter__(self):
        while True:
            b = self.batch(self.step)
            self.step += 1
            self.served += len(b)
            if len(self.served_head) < 10_000:
                self.served_head += b.tolist()
            self._sha.update(b.numpy().tobytes())
            yield b

    def record(self) -> dict:
        return {"served": self.served, "sha256": self._sha.hexdigest(), "head": self.served_head}


def _inputs_key(table, taxonomy, resolution: int, encoder: str) -> str:
    """The cache entry of these inputs: preprocessing, encoder, and per record its path, lineage,
    box and file (size, mtime): a replaced or truncated image makes a new entry, never a stale
    read. A stat per file is cheap next to decoding it."""
    h = hashlib.sha256()
    h.update(json.dumps([table.preprocess, resolution, encoder, list(taxonomy.ranks)]).encode())
    for r in table.records:
        try:
            st = os.stat(r.path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{r.path}|{'/'.join(r.lineage)}|{r.box}|{stamp}\n".encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def cache_model_inputs(table, taxonomy, backbone, resolution: int, device, accelerator,
                       batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every image once through evaluation preprocessing (centre crops, no random crops) and, with a
    VAE, its encoder (the latent mean times the scaling factor). Returns (inputs fp16 (N, C, h, w),
    ids (N, L) with -1 rows for unreadable images, unreadable paths). Cached on disk, keyed by the
    files' paths, sizes and modification times (`_inputs_key`)."""
    from .datasets.images import SpeciesImageDataset
    enc = module_fingerprint(backbone.vae) if backbone.vae is not None else "pixels"
    f = cache_root() / "inputs" / f"{_inputs_key(table, taxonomy, resolution, enc)}.safetensors"
    if accelerator.is_main_process and not f.exists():
        ds = SpeciesImageDataset(table, taxonomy, resolution, train=False)
        xs, ids, bad = [], [], []
        for i0 in tqdm(range(0, len(ds), batch_size), desc="caching inputs", unit="batch",
                       disable=not accelerator.is_main_process):
            items = [ds[i] for i in range(i0, min(i0 + batch_size, len(ds)))]
            x = torch.stack([it["pixels"] for it in items])
            if backbone.vae is not None:
                vae = backbone.vae
                x = vae.encode(x.to(device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
            xs.append(x.to("cpu", torch.float16))
            for it in items:
                row = it["ids"].clone()
                if it["bad"]:
                    bad.append(table.records[it["index"]].path)
                    row[:] = -1
                ids.append(row)
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(".tmp")
        # the VAE's mid-block attention returns a non-contiguous latent (SD v1.5's VAE too)
        save_file({"inputs": torch.cat(xs).contiguous(), "ids": torch.stack(ids).contiguous()}, tmp,
                  metadata={"bad": json.dumps(bad)})
        tmp.replace(f)
    accelerator.wait_for_everyone()
    t = load_file(f)
    from safetensors import safe_open
    with safe_open(f, "pt") as fh:
        bad = json.loads(fh.metadata()["bad"])
    return t["inputs"], t["ids"], bad
