"""The training data stream: which records each rank sees at each step, and the input cache's set-up.

The stream is a fixed function of (seed, step): epoch e is a permutation of the records drawn from
seed + e; micro-step s takes the global batch stream[s*B*W : (s+1)*B*W] and rank r its slice
[r*B : (r+1)*B] (B per-rank batch, W world size, r the GLOBAL rank: the released code used the local
rank, so every node saw the same quarter of the data). Resuming at step s replays the stream exactly.
"""
from __future__ import annotations

import hashlib

import torch

from .latent_cache import LatentCache, fill_cache, pixel_encoder, vae_encoder


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


def cache_model_inputs(table, backbone, resolution: int, device, accelerator, directory, *,
                       margin: int | None = None, flip: bool = False, on_mismatch: str = "rebuild",
                       batch_size: int = 32, num_workers: int = 0, log=print) -> LatentCache:
    """Every image once through its preset's evaluation preprocessing at resolution + margin
    (latent_cache.default_margin: 0 for presets that centre-crop or pad) and, with a VAE, its encoder
    (the latent mean times the scaling factor; without one the cache holds pixels). Every process
    encodes its share (global rank), then the main process merges the indexes (latent_cache.py).
    Returns the cache, opened for reading; `cache.bad` flags unreadable images."""
    enc = vae_encoder(backbone.vae, device) if backbone.vae is not None else pixel_encoder()
    return fill_cache(directory, table.records, enc, preprocess=table.preprocess, resolution=resolution,
                      margin=margin, flip=flip, rank=accelerator.process_index,
                      world=accelerator.num_processes, barrier=accelerator.wait_for_everyone,
                      batch_size=batch_size, num_workers=num_workers, on_mismatch=on_mismatch, log=log,
                      progress=accelerator.is_main_process)
