"""The generated samples of an evaluation: split over processes, streamed to disk, resumable (issue 22).

Work is cut into units of (taxon, a run of at most batch_size image indices): image i of taxon t always
comes from the generator `image_seed(taxon_seed(seed, t), i)` (pipeline.image_generators), and a unit
is the batch the one-process loop sampled it in, so neither the number of processes nor a resume can
change an image. Units are dealt in order (every taxon of every level) each to the process with the
fewest images so far, lowest global rank on a tie: every process computes the same plan, a few taxa
still spread over many processes, and a taxon's short last batch does not always land on one rank
(plain k % world would, when a taxon's unit count divides by the world size).

Each image is written as soon as its batch is decoded (a temporary name, then a rename: a killed run
never leaves a half-written PNG under the final name) and nothing is kept: the generate loop returns a
`stream.GeneratedImages`, which reads the PNGs back per taxon. On a rerun an existing PNG is reused
when it decodes fully at the expected size; a missing or damaged one (truncated, wrong size) is
regenerated alone and counted. `stats` (per process, gathered by evaluate into generation.json):
images, reused, generated, damaged (of the generated, those that replaced a damaged file).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from ..taxonomy import Taxon
from .stream import GeneratedImages, sample_dir
from .tables import taxon_seed

PNG_END = b"\0\0\0\0IEND\xaeB`\x82"   # every PNG ends with this empty IEND chunk
SAMPLING_KEYS = ("guidance", "guidance_scale", "guide_level", "num_inference_steps", "batch_size")


def png_ok(path: Path, size: int | None = None) -> bool:
    """The file is a whole PNG (every chunk's CRC and the end chunk: `verify`; a file cut short after
    its pixel data still decodes) that decodes as RGB, size x size when given."""
    from PIL import Image
    try:
        with open(path, "rb") as fh:   # PIL leaves the end chunk's own CRC unread
            fh.seek(-len(PNG_END), os.SEEK_END)
            if fh.read() != PNG_END:
                return False
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()
            return im.mode == "RGB" and (size is None or im.size == (size, size))
    except Exception:   # any unreadable file is regenerated, whatever PIL calls its fault
        return False


def units(taxa: Sequence[Taxon], n: int, batch_size: int) -> list[tuple[Taxon, int, int]]:
    """(taxon, first index, end index) per batch of every taxon, in taxon order."""
    return [(t, a, min(a + batch_size, n)) for t in taxa for a in range(0, n, batch_size)]


def deal(work: Sequence[tuple[Taxon, int, int]], rank: int, world: int) -> list[tuple[Taxon, int, int]]:
    """The units of process `rank`: each unit to the least loaded process (images), lowest rank on a tie."""
    load, mine = [0] * world, []
    for u in work:
        r = min(range(world), key=lambda k: (load[k], k))
        load[r] += u[2] - u[1]
        if r == rank:
            mine.append(u)
    return mine


def _write(images, names: Sequence[Path]) -> None:
    from ..imaging import to_pil
    for img, f in zip(images, names):
        tmp = f.with_name(f".{f.name}.tmp")
        to_pil(img).save(tmp, format="PNG")
        os.replace(tmp, f)


def generate(pipe, taxa: Sequence[Taxon], n: int, out: Path, settings: dict, *, rank: int = 0,
             world: int = 1, size: int | None = None, progress: bool = True) -> GeneratedImages:
    """n images per taxon under sample_dir(out, taxon); this process samples the units of `rank`.

    Returns the images of every taxon (read back from disk on access, once every process is done);
    `.stats` counts this process' units. `size`: the expected PNG side, checked on reuse."""
    from ..pipeline import image_generators
    stats = {"images": 0, "reused": 0, "generated": 0, "damaged": 0}
    mine = deal(units(taxa, n, int(settings["batch_size"])), rank, world)
    bar = tqdm(total=sum(b - a for _, a, b in mine), desc="generating", unit="img",
               disable=not progress)
    for t, a, b in mine:
        d = sample_dir(out, t)
        todo = []
        for i in range(a, b):
            f = d / f"{i:04d}.png"
            if f.exists() and png_ok(f, size):
                stats["reused"] += 1
                continue
            stats["damaged"] += f.exists()
            todo.append(i)
        if todo:
            seed = taxon_seed(settings["seed"], t)
            gens = [g for i in todo for g in image_generators(seed, 1, i)]
            images = pipe(t, num_images=len(todo), generator=gens, output_type="uint8", progress=False,
                          **{k: settings[k] for k in SAMPLING_KEYS}).images
            d.mkdir(parents=True, exist_ok=True)
            _write(images, [d / f"{i:04d}.png" for i in todo])
            del images   # nothing is kept: the metrics read the PNGs back
            stats["generated"] += len(todo)
        stats["images"] += b - a
        bar.update(b - a)
    bar.close()
    res = GeneratedImages(out, taxa, n)
    res.stats = stats
    return res
