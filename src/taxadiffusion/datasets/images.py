"""Image loading, the per-format preprocessing of the released code, and the training Dataset.

PREPROCESS maps a Table's `preprocess` key to `fn(img, box, resolution, rng) -> square PIL image`;
`rng` is a numpy Generator for training and None for evaluation (deterministic). The released code
(REFERENCE-FACTS.md "Data handling"; aminK8/TaxaDiffusion taxa_diffusion/datasets/*.py):
- "fishnet": crop to the box, then for training 50% a random square crop along the long side and
  50% an aspect-distorting squash of the whole crop; for evaluation a centre square crop.
- "bioscan": pad to a square with white (255, 255, 255), image centred.
- "inat": random square crop along the long side for training, centre square crop for evaluation.
- "center": centre square crop (generic CSV).
Resize: the released code uses cv2 LANCZOS4 when enlarging and INTER_AREA when shrinking (decided by
the shorter side against the resolution). We use PIL's LANCZOS to enlarge and BOX to shrink: BOX is
PIL's exact area average, the same filter as INTER_AREA. (BIOSCAN's code used LANCZOS4 even to shrink;
we use the same rule for every format.) No flips, as released. EXIF orientation is not applied:
FishNet boxes are in stored-pixel coordinates.

A corrupt or unreadable image never stops a run: SpeciesImageDataset returns the next readable
record instead (deterministic), flags the item with bad=1 and warns once per file; `check_images`
opens every image up front so prepare/training can count and report them.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..taxonomy import Taxonomy
from .table import DataError, Table

RESAMPLE_UP = Image.Resampling.LANCZOS
RESAMPLE_DOWN = Image.Resampling.BOX
WHITE = (255, 255, 255)
Box = tuple[float, float, float, float]   # x1, y1, x2, y2 in pixels (FishNet box files)


class BadImageWarning(UserWarning):
    """An image could not be read and was replaced by another record's image."""


# Single-channel modes wider than 8 bits. PIL's convert("RGB") clips them at 255 (a 16-bit PNG
# comes out nearly white), so they are scaled by hand. 16-bit RGB PNGs PIL already reads as 8-bit
# "RGB" (the high byte of each sample), which is the right scaling.
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in WIDE_MODES:
        a = np.asarray(im).astype(np.float64)
        top = float(a.max()) if a.size else 0.0
        if im.mode == "F" and top <= 1.0:
            a = a * 255.0                  # float images in [0, 1]
        elif im.mode.startswith("I;16") or top > 255:
            # 16-bit data (mode "I" is how PIL once read 16-bit PNGs): 65535 -> 255; wider data
            # is scaled by its own maximum. Values <= 255 in "I"/"F" are 8-bit data stored wide.
            a = a / (257.0 if top <= 65535 else top / 255.0)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("P", "PA"):  # palette transparency goes through RGBA, as released
        im = im.convert("RGBA")
    return im.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """The decoded 8-bit RGB image; raises whatever PIL raises for a missing or corrupt file."""
    with Image.open(path) as im:
        im.load()  # decode now, so a truncated file fails here and not later in a crop
        return _to_rgb(im)


def _resize(img: Image.Image, resolution: int) -> Image.Image:
    up = min(img.size) < resolution
    return img.resize((resolution, resolution), RESAMPLE_UP if up else RESAMPLE_DOWN)


def _square(img: Image.Image, rng: np.random.Generator | None) -> Image.Image:
    """A square of the shorter side, placed at random along the long side (rng) or centred."""
    w, h = img.size
    s = min(w, h)
    slack = max(w, h) - s
    off = int(rng.integers(0, slack + 1)) if rng is not None else slack // 2
    return img.crop((off, 0, off + s, s) if w >= h else (0, off, s, off + s))


def crop_box(img: Image.Image, box: Box | None) -> Image.Image:
    """The box clipped to the image; the whole image when there is no box or nothing is left."""
    if box is None:
        return img
    w, h = img.size
    x1, y1 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
    x2, y2 = min(w, int(np.ceil(box[2]))), min(h, int(np.ceil(box[3])))
    if x2 <= x1 or y2 <= y1:
        return img
    return img.crop((x1, y1, x2, y2))


def fishnet(img: Image.Image, box: Box | None, resolution: int,
            rng: np.random.Generator | None) -> Image.Image:
    img = crop_box(img, box)
    if rng is None:
        return _resize(_square(img, None), resolution)
    # released: `if random.random() > 1 - threshold` (threshold 0.5) crops, otherwise squashes
    if rng.random() < 0.5:
        return _resize(_square(img, rng), resolution)
    return _resize(img, resolution)


def bioscan(img: Image.Image, box: Box | None, resolution: int,
            rng: np.random.Generator | None) -> Image.Image:
    w, h = img.size
    s = max(w, h)
    canvas = Image.new("RGB", (s, s), WHITE)
    canvas.paste(img, ((s - w) // 2, (s - h) // 2))
    return _resize(canvas, resolution)


def inat(img: Image.Image, box: Box | None, resolution: int,
         rng: np.random.Generator | None) -> Image.Image:
    return _resize(_square(img, rng), resolution)


def center(img: Image.Image, box: Box | None, resolution: int,
           rng: np.random.Generator | None) -> Image.Image:
    return _resize(_square(img, None), resolution)


PREPROCESS: dict[str, Callable[..., Image.Image]] = {
    "fishnet": fishnet,
    "bioscan": bioscan,
    "inat": inat,
    "center": center,
}


def to_tensor(img: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1], as the released code (x / 127.5 - 1)."""
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return a.float().div_(127.5).sub_(1.0)


class SpeciesImageDataset(torch.utils.data.Dataset):
    """Records of a Table as {"pixels", "ids", "index", "bad", "requested"}.

    pixels: (3, R, R) in [-1, 1]. ids: (num_levels,) vocabulary id per level, -1 below the record's
    lineage (the "keep" policy). index: the record actually returned. requested: the record asked
    for; when bad, it is the unreadable one, so a log names `records[requested]`, not the
    replacement. bad: 1 when record `index` replaced an unreadable one: then the item is wholly
    that record (its image AND its ids), so image and labels always agree; it is the next readable
    record after the requested one, so the replacement is deterministic. Training crops draw from a generator seeded with
    (seed, epoch, index): the same item is the same tensor on every run, worker count and resume,
    and changes from epoch to epoch (`set_epoch`). Evaluation (train=False) crops are fixed.
    """

    def __init__(self, table: Table, taxonomy: Taxonomy, resolution: int, train: bool,
                 seed: int = 0, preprocess: str | None = None):
        key = preprocess or table.preprocess
        if key not in PREPROCESS:
            raise ValueError(f"unknown preprocessing {key!r}; known: {', '.join(PREPROCESS)}")
        self.records = table.records
        self.fn = PREPROCESS[key]
        self.resolution, self.train, self.seed = int(resolution), bool(train), int(seed)
        self.epoch = 0
        self.ids = torch.full((len(self.records), taxonomy.num_levels), -1, dtype=torch.long)
        for i, r in enumerate(self.records):
            try:
                ids = taxonomy.ids(taxonomy.make(r.lineage))
            except KeyError as e:
                raise ValueError(f"{r.source}, row {r.row}: lineage {' > '.join(r.lineage)} is not "
                                 f"in the taxonomy given to the dataset") from e
            self.ids[i, : len(ids)] = torch.tensor(ids)
        self._bad: set[int] = set()      # per worker process: known unreadable records
        self._warned: set[str] = set()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def rng(self, index: int, epoch: int | None = None) -> np.random.Generator | None:
        epoch = self.epoch if epoch is None else epoch
        return np.random.default_rng([self.seed, epoch, index]) if self.train else None

    def pixels(self, index: int) -> torch.Tensor:
        """The preprocessed image of record `index`; raises if the file cannot be decoded."""
        r = self.records[index]
        img = load_image(r.path)
        return to_tensor(self.fn(img, r.box, self.resolution, self.rng(index)))

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        """`dataset[i]`, or `dataset[(i, epoch)]`: the training loop's batch sampler passes the
        epoch with each index, so DataLoader workers need no shared `set_epoch` state."""
        index, epoch = item if isinstance(item, tuple) else (item, self.epoch)
        n = len(self.records)
        for k in range(n):
            j = (index + k) % n
            if j in self._bad:
                continue
            r = self.records[j]
            try:
                img = load_image(r.path)
            except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ... for bad files
                self._bad.add(j)
                if r.path not in self._warned:
                    self._warned.add(r.path)
                    warnings.warn(f"unreadable image {r.path} ({r.source}, row {r.row}): "
                                  f"{type(e).__name__}: {e}; replaced by the next readable record",
                                  BadImageWarning, stacklevel=2)
                continue
            px = to_tensor(self.fn(img, r.box, self.resolution, self.rng(j, epoch)))
            return {"pixels": px, "ids": self.ids[j].clone(), "index": j, "bad": int(k > 0),
                    "requested": index}
        raise RuntimeError(f"none of the {n} images of this table can be read (first: "
                           f"{self.records[0].path})")


def _check(path: str) -> str | None:
    try:
        with Image.open(path) as im:
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))  # JPEG: decode at 1/8
            im.load()
            _to_rgb(im)  # a mode PIL cannot convert fails here, not in the middle of training
        return None
    except Exception as e:  # every reason a file cannot be decoded
        return f"{type(e).__name__}: {e}"


def check_images(table: Table, workers: int | None = None) -> tuple[Table, list[tuple[str, str]]]:
    """Open (fully decode) every image; return the table without unreadable ones and the
    (path, error) list. Dropped rows are counted in report.dropped["unreadable image"] with one
    warning per file. Threads: PIL releases the GIL while decoding."""
    paths = [r.path for r in table.records]
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as ex:
        errors = list(tqdm(ex.map(_check, paths, chunksize=64), total=len(paths),
                           desc="check images", unit="img"))
    bad_records = [(r, e) for r, e in zip(table.records, errors) if e is not None]
    bad = [(r.path, e) for r, e in bad_records]
    if len(bad) == len(paths):
        raise DataError(table.root, None, None, f"none of the {len(paths)} images can be read; "
                        f"first: {bad[0][0]}: {bad[0][1]}")
    report = copy.deepcopy(table.report)
    if bad:
        report.dropped["unreadable image"] += len(bad)
        report.warnings.extend(f"{r.source}, row {r.row}, field 'image': unreadable image {r.path}: "
                               f"{e}; row dropped" for r, e in bad_records)
    ok = [r for r, e in zip(table.records, errors) if e is None]
    return dataclasses.replace(table, records=ok, report=report), bad
