"""The input cache: every image's VAE latent (or, without a VAE, its pixels), encoded once by all
processes of a run together, read memory-mapped one record at a time.

Layout of the cache folder (the caller passes it: `data.cache_dir`, default `<run>/latents`, so
every node can be pointed at one shared path):
  cache.json             what the cache holds (`fingerprint`): the encoder (module_fingerprint:
                         config and weights of the VAE, or "pixels"), resolution, margin, crop
                         policy, flips, shapes, and a digest of the records (path, size, mtime, lineage, box). Another one is
                         rebuilt (`on_mismatch="rebuild"`) or refused ("error"), never reused.
  shard-r<rank>-<k>.safetensors   x (n, V, C, h, w) fp16 (V = 2 with flips: the image and its mirror),
                         rec (n,) record indices, bad (n,) 1 for unreadable images (x is zero there).
  index-r<rank>.jsonl    one line per shard that rank wrote: name, rows, bytes, sha256, records.
  index.safetensors      the merged index: per record its shard and row (and the bad flag).

Filling (`fill_cache`): every process encodes its share by GLOBAL rank (missing records i with
i % world == rank, so nodes split the work; the released code encoded on the main process while the
others waited at a barrier, past NCCL's timeout on large sets), writes its own shards and index
(a shard is renamed into place before its line is appended: a killed fill leaves at most an
unlisted file), and checks the shards already there (its share of them: size and sha256 against the
index; a missing, truncated or altered shard is named in the error). A re-run encodes only what no
listed shard holds. The barrier after the encode is followed by the merge on the main process only.

Reading (`LatentCache`): per-record (shard, row) arrays only, shard handles opened lazily
(`safe_open`, memory-mapped; at most `max_open`, 16, at once) and `get_slice` reads the one row and
window needed, so a training process's memory does not grow with the images (the old single file
was loaded whole on every rank: iNat 2021 at 4x64x64 fp16 is ~88 GB per rank).

Augmentation survives the cache: images are encoded at resolution + margin (default about 1/8 more,
a multiple of 8: 576 px for 512) and a training item is a random square window of the latent at one
latent pixel's granularity (8 image pixels), from a generator seeded with (seed, epoch, record), so
the stream stays deterministic and resumable; flips come from the cached mirrored image's latent
(a flipped latent is not the latent of the flipped image; benchmarks/cache_memory.py --vae measures
how far apart they are on the real SD VAE). The encoded image is the preset's evaluation
preprocessing at the larger size (a centre square), so the random window replaces the released
code's random square along the long side by a smaller shift in both directions. Presets whose
training preprocessing is deterministic (BIOSCAN's white padding, the generic centre crop) keep
margin 0: exactly what the uncached path trains on.

Why safetensors shards and not MDS (mosaicml-streaming) or webdataset tar shards: safetensors is
already a dependency (no new one), it gives random access by record (the training stream is a
seeded permutation that resumes at any step; tar shards are read sequentially), and it is
memory-mapped (only the rows read are paged in, shared between the processes of a node).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .backbone import module_fingerprint

VERSION = 1
EXACT = ("bioscan", "center")   # presets that train on a deterministic preprocessing: no crop
SHARD_ROWS = 1024


class CacheError(RuntimeError):
    """The cache folder cannot be used as it is (named shard, differing fingerprint fields)."""


def default_margin(preprocess: str, resolution: int) -> int:
    """Pixels encoded beyond the training resolution: 0 for presets that centre-crop or pad, else
    resolution * 9/8 rounded up to a multiple of 8 (576 for 512, 72 for 64)."""
    return 0 if preprocess in EXACT else 8 * math.ceil(resolution / 64)


@dataclass(frozen=True)
class Encoder:
    """`fn(pixels (n, 3, S, S) in [-1, 1]) -> (n, channels, S / unit, S / unit)`; `name` is what
    the cache is keyed on (the VAE's module fingerprint, or "pixels")."""
    fn: Callable[[torch.Tensor], torch.Tensor]
    name: str
    unit: int
    channels: int


def pixel_encoder() -> Encoder:
    return Encoder(lambda x: x, "pixels", 1, 3)


def vae_encoder(vae, device, name: str | None = None) -> Encoder:
    """The latent mean times the scaling factor, as the uncached path's posterior minus its noise."""
    @torch.no_grad()
    def fn(x):
        lat = vae.encode(x.to(device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
        return lat.float().cpu()  # the VAE's mid-block attention returns it non-contiguous
    unit = 2 ** (len(vae.config.block_out_channels) - 1)
    return Encoder(fn, name or module_fingerprint(vae), unit, vae.config.latent_channels)


def fingerprint(records, encoder: Encoder, preprocess: str, resolution: int, margin: int,
                flip: bool) -> dict:
    """cache.json's content: what every field of the cache depends on. A stat per file is cheap
    next to decoding it; a replaced image (new size or mtime) changes the digest."""
    if margin < 0 or margin % encoder.unit or resolution % encoder.unit:
        raise ValueError(f"margin {margin} and resolution {resolution} must be multiples of the "
                         f"encoder's downsampling ({encoder.unit})")
    h = hashlib.sha256()
    for r in records:
        try:
            st = os.stat(r.path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{r.path}|{stamp}|{'/'.join(r.lineage)}|{r.box}\n".encode())
    return {"version": VERSION, "encoder": encoder.name, "resolution": resolution, "margin": margin,
            "crop": preprocess, "flip": bool(flip), "unit": encoder.unit, "channels": encoder.channels,
            "dtype": "float16", "records": len(records), "data": h.hexdigest()[:24]}


# -- filling ----------------------------------------------------------------------------------------
class _Items(torch.utils.data.Dataset):
    """Record -> (views (V, 3, S, S), bad): the evaluation preprocessing at S = resolution + margin,
    and the mirror image of it with flips."""

    def __init__(self, records, which, preprocess, size, flip):
        self.records, self.which, self.size, self.flip = records, which, size, flip
        from .datasets.images import PREPROCESS
        self.fn = PREPROCESS[preprocess]

    def __len__(self):
        return len(self.which)

    def __getitem__(self, k):
        from PIL import Image

        from .datasets.images import load_image, to_tensor
        i = self.which[k]
        r = self.records[i]
        try:
            img = self.fn(load_image(r.path), r.box, self.size, None)
        except Exception:  # every reason an image cannot be decoded; counted, never fatal
            return i, torch.zeros(1 + self.flip, 3, self.size, self.size), 1
        views = [img] + ([img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)] if self.flip else [])
        return i, torch.stack([to_tensor(v) for v in views]), 0


def _as_list(batch):
    return batch


def _sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while chunk := fh.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def _lines(directory: Path) -> list[tuple[Path, dict]]:
    """Every listed shard, in a fixed order: (the index file listing it, its line)."""
    out = []
    for f in sorted(directory.glob("index-r*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                try:
                    out.append((f, json.loads(line)))
                except json.JSONDecodeError:  # a line cut by a kill: its shard is re-encoded
                    continue
    return out


def _problem(directory: Path, e: dict, full: bool) -> str | None:
    f = directory / e["shard"]
    if not f.exists():
        return "missing"
    size = f.stat().st_size
    if size != e["bytes"]:
        return f"truncated ({size} of {e['bytes']} bytes)" if size < e["bytes"] else \
            f"{size} bytes, the index says {e['bytes']}"
    if full and _sha256(f) != e["sha256"]:
        return "altered (sha256 differs from the index)"
    return None


def check_shards(directory: Path, entries, full: bool = True) -> None:
    for index, e in entries:
        p = _problem(directory, e, full)
        if p and index.name == "index.safetensors":   # the reader: the merged index
            raise CacheError(f"latent cache {directory}: shard {e['shard']} is {p}; delete the folder "
                             f"to rebuild the cache, or fill it again to find the index line naming it")
        if p:
            raise CacheError(f"latent cache {directory}: shard {e['shard']} is {p} (listed in {index.name}); "
                             f"delete the folder to rebuild the cache, or that line of {index.name} "
                             f"to re-encode its {e['rows']} records")


def _ours(directory: Path) -> list[Path]:
    return [p for pat in ("shard-r*.safetensors", "shard-r*.tmp", "index-r*.jsonl", "index.safetensors",
                          "index.tmp", "cache.json") for p in directory.glob(pat)]


def _prepare(directory: Path, fp: dict, on_mismatch: str, log) -> None:
    """Main process: cache.json is this fingerprint; a cache of something else is rebuilt or refused."""
    f = directory / "cache.json"
    if f.exists():
        old = json.loads(f.read_text())
        if old == fp:
            return
        diff = ", ".join(f"{k}: {old.get(k)} -> {fp.get(k)}" for k in fp if old.get(k) != fp.get(k))
        why = f"latent cache {directory} holds other inputs ({diff})"
    elif _ours(directory):
        why = f"latent cache {directory} has shards but no cache.json"
    else:
        directory.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(fp, indent=1))
        return
    if on_mismatch != "rebuild":
        raise CacheError(why + "; point the run at another folder, or delete this one to rebuild it")
    log(why + "; rebuilding it")
    for p in _ours(directory):
        p.unlink()
    f.write_text(json.dumps(fp, indent=1))


def fill_cache(directory, records, encoder: Encoder, *, preprocess: str, resolution: int,
               margin: int | None = None, flip: bool = False, rank: int = 0, world: int = 1,
               barrier: Callable[[], None] = lambda: None, batch_size: int = 32, num_workers: int = 0,
               shard_rows: int = SHARD_ROWS, on_mismatch: str = "rebuild", verify: str = "full",
               log: Callable[[str], None] = print, progress: bool = True) -> "LatentCache":
    """Encode what `directory` lacks of `records` (every process of the run calls this with its
    global rank; `barrier` waits for all of them) and return the cache, merged and opened.
    `verify`: "full" checks each listed shard's size and sha256 (each rank its share), "size" sizes only."""
    from tqdm.auto import tqdm
    if on_mismatch not in ("rebuild", "error") or verify not in ("full", "size"):
        raise ValueError(f"on_mismatch must be rebuild|error, verify full|size; got {on_mismatch}, {verify}")
    directory = Path(directory)
    margin = default_margin(preprocess, resolution) if margin is None else int(margin)
    if rank == 0:
        _prepare(directory, fingerprint(records, encoder, preprocess, resolution, margin, flip),
                 on_mismatch, log)
    barrier()
    fp = json.loads((directory / "cache.json").read_text())
    entries = _lines(directory)
    check_shards(directory, entries[rank::world], full=verify == "full")
    present = np.zeros(len(records), bool)
    for _, e in entries:
        present[e["records"]] = True
    mine = [i for i in np.flatnonzero(~present).tolist() if i % world == rank]
    stats = {"encoded": len(mine), "present": int(present.sum()), "rank": rank}
    if mine:
        index = directory / f"index-r{rank:05d}.jsonl"
        if index.exists() and index.stat().st_size:
            with open(index, "rb+") as fh:   # a line cut by a kill: the next one starts afresh
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
        taken = [n.name for n in directory.glob(f"shard-r{rank:05d}-*.safetensors")]
        taken += [e["shard"] for _, e in entries]
        k = 1 + max((int(n.split("-")[2].split(".")[0]) for n in taken if n.startswith(f"shard-r{rank:05d}-")),
                    default=-1)             # never overwrites a shard, listed or left by a kill
        S = resolution + margin
        loader = torch.utils.data.DataLoader(_Items(records, mine, preprocess, S, flip), batch_size=batch_size,
                                             num_workers=num_workers, collate_fn=_as_list)
        xs, recs, bads = [], [], []
        bar = tqdm(total=len(mine), desc=f"encoding inputs (rank {rank})", unit="img", disable=not progress)

        def flush():
            nonlocal k, xs, recs, bads
            name = f"shard-r{rank:05d}-{k:06d}.safetensors"
            tmp = directory / (name[:-len(".safetensors")] + ".tmp")
            save_file({"x": torch.cat(xs).contiguous(), "rec": torch.tensor(recs, dtype=torch.int64),
                       "bad": torch.tensor(bads, dtype=torch.uint8)}, tmp)
            size, sha = tmp.stat().st_size, _sha256(tmp)
            tmp.replace(directory / name)
            with open(index, "a") as fh:
                fh.write(json.dumps({"shard": name, "rows": len(recs), "bytes": size, "sha256": sha,
                                     "records": recs, "bad": [i for i, b in zip(recs, bads) if b]}) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            k, xs, recs, bads = k + 1, [], [], []

        for items in loader:
            V = 1 + flip
            px = torch.cat([v for _, v, _ in items])
            lat = encoder.fn(px)
            h = S // encoder.unit
            if lat.shape[1:] != (encoder.channels, h, h):
                raise ValueError(f"encoder gave {tuple(lat.shape[1:])} for {S} px, expected "
                                 f"{(encoder.channels, h, h)}")
            lat = lat.reshape(len(items), V, *lat.shape[1:]).to(torch.float16)
            for j, (i, _, bad) in enumerate(items):
                xs.append(torch.zeros_like(lat[j:j + 1]) if bad else lat[j:j + 1])
                recs.append(i)
                bads.append(bad)
                if len(recs) == shard_rows:
                    flush()
            bar.update(len(items))
        if recs:
            flush()
        bar.close()
    barrier()       # every rank's share is on disk; the main process merges the indexes
    if rank == 0:
        _merge(directory, len(records), fp)
    barrier()
    cache = LatentCache(directory)
    cache.stats = stats
    return cache


def _merge(directory: Path, n: int, fp: dict) -> None:
    entries = _lines(directory)
    shard = np.full(n, -1, np.int32)
    row = np.zeros(n, np.int32)
    bad = np.zeros(n, np.uint8)
    names = []
    for j, (_, e) in enumerate(entries):
        names.append([e["shard"], e["bytes"], e["sha256"]])
        recs = np.asarray(e["records"], np.int64)
        shard[recs] = j
        row[recs] = np.arange(len(recs), dtype=np.int32)
        bad[np.asarray(e.get("bad", []), np.int64)] = 1
    missing = np.flatnonzero(shard < 0)
    if len(missing):
        raise CacheError(f"latent cache {directory}: {len(missing)} records were not encoded "
                         f"(first: {missing[:5].tolist()}); a process failed during the fill")
    tmp = directory / "index.tmp"
    save_file({"shard": torch.from_numpy(shard), "row": torch.from_numpy(row), "bad": torch.from_numpy(bad)},
              tmp, metadata={"shards": json.dumps(names), "fingerprint": json.dumps(fp)})
    tmp.replace(directory / "index.safetensors")


# -- reading ----------------------------------------------------------------------------------------
class LatentCache:
    """A filled cache, read by record: `read(i)`, `window(i, epoch, seed)`, `batch(indices, epoch,
    seed)`; `bad` (N,) bool: unreadable images (train on none of them)."""

    def __init__(self, directory, max_open: int = 16):
        self.dir = Path(directory)
        f = self.dir / "index.safetensors"
        if not f.exists():
            raise CacheError(f"latent cache {self.dir} is not filled (no index.safetensors); run fill_cache")
        self.fp = json.loads((self.dir / "cache.json").read_text())
        idx = load_file(f)
        with safe_open(f, "pt") as fh:
            meta = fh.metadata()
        if json.loads(meta["fingerprint"]) != self.fp:
            raise CacheError(f"latent cache {self.dir}: index.safetensors was merged for another cache.json")
        self.shards = [n for n, _, _ in json.loads(meta["shards"])]
        check_shards(self.dir, [(f, {"shard": n, "bytes": b})
                                for n, b, _ in json.loads(meta["shards"])], full=False)
        self.shard, self.row = idx["shard"].numpy(), idx["row"].numpy()
        self.bad = idx["bad"].bool()
        self.max_open = max_open
        self._open: OrderedDict[int, object] = OrderedDict()
        m, u = self.fp["margin"], self.fp["unit"]
        self.side = self.fp["resolution"] // u        # the training window, in cached pixels
        self.slack = m // u                           # window offsets: 0..slack
        self.views = 2 if self.fp["flip"] else 1
        self.stats: dict = {}

    def __len__(self) -> int:
        return len(self.shard)

    def _slice(self, i: int):
        j = int(self.shard[i])
        h = self._open.pop(j, None)
        if h is None:
            h = safe_open(self.dir / self.shards[j], "pt")
            while len(self._open) >= self.max_open:
                self._open.popitem(last=False)
        self._open[j] = h
        return h.get_slice("x")

    def read(self, i: int, view: int = 0) -> torch.Tensor:
        """The whole cached (C, side + slack, side + slack) array of record i (view 1: mirrored)."""
        r = int(self.row[i])
        return self._slice(i)[r:r + 1, view:view + 1][0, 0]

    def window(self, i: int, epoch: int, seed: int) -> tuple[int, int, int]:
        """(view, top, left) of record i's training window in epoch `epoch`: seeded per
        (seed, epoch, record), the same on every rank, run and resume."""
        rng = np.random.default_rng([seed, epoch, int(i)])
        view = int(rng.random() < 0.5) if self.views == 2 else 0
        top, left = (int(v) for v in rng.integers(0, self.slack + 1, 2))
        return view, top, left

    def crop(self, i: int, view: int, top: int, left: int) -> torch.Tensor:
        r, s = int(self.row[i]), self.side
        return self._slice(i)[r:r + 1, view:view + 1, :, top:top + s, left:left + s][0, 0]

    def batch(self, indices, epoch: int, seed: int) -> torch.Tensor:
        """(B, C, side, side) fp16: each record's seeded window (and view) of this epoch."""
        return torch.stack([self.crop(int(i), *self.window(int(i), epoch, seed)) for i in indices])
