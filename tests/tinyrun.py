"""Helpers for tests that train: a tiny generic-CSV image set and a tiny config (seconds on a CPU)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

LINEAGES = [("Aves", "Corvidae", "Corvus", "corax"), ("Aves", "Corvidae", "Corvus", "frugilegus"),
            ("Aves", "Corvidae", "Pica", "pica"), ("Aves", "Paridae", "Parus", "major")]


def write_images(root: Path, per_species: int = 6, size: int = 20, seed: int = 0) -> Path:
    """Colour blobs per species; metadata.csv in the generic layout (file_name + rank columns)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for s, lin in enumerate(LINEAGES):
        colour = np.array([60 * s, 255 - 50 * s, 120], np.uint8)
        for i in range(per_species):
            img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            y, x = rng.integers(2, size // 2, 2)
            img[y:y + size // 3, x:x + size // 3] = colour
            name = f"img/{lin[-1]}_{i}.png"
            (root / "img").mkdir(exist_ok=True)
            Image.fromarray(img).save(root / name)
            rows.append([name, *lin])
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "class", "family", "genus", "specific_epithet"])
        w.writerows(rows)
    return root


def tiny_overrides(data_root: Path, out: Path, name: str = "t") -> list[str]:
    return [f"data.root={data_root}", "data.ranks=[class, family, genus, species]",
            "data.resolution=16", f"train.output_dir={out}", f"name={name}",
            "model.block_out_channels=[16, 32]", "model.cross_attn_levels=[false, true]",
            "model.text_width=32", "model.level_ff=64", "train.batch_size=4",
            "train.steps_stage0=8", "train.steps_per_stage=3", "train.checkpoint_every=2",
            "train.log_every=1", "train.validate_every=0", "train.validation_seeds=2"]
