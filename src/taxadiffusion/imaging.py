"""Image grids with row and column labels (validation grids, trait rows, sample sheets, reports).

Images are torch uint8 tensors (N, 3, H, W), as the pipeline returns with output_type="uint8".
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray(img.permute(1, 2, 0).cpu().numpy())


def save_pngs(images: torch.Tensor, names: Sequence[str], folder: str | Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for img, name in zip(images, names):
        out.append(folder / f"{name}.png")
        to_pil(img).save(out[-1])
    return out


def read_pngs(files: Sequence[str | Path]) -> torch.Tensor:
    """The counterpart of save_pngs: uint8 (N, 3, H, W), RGB, in writable memory (np.array, not
    np.asarray: torch warns on, and must not write to, a read-only PIL buffer)."""
    return torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)
                        for f in files])


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without scalable default font
        return ImageFont.load_default()


def labelled_grid(rows: Sequence[torch.Tensor], row_labels: Sequence[str] = (),
                  col_labels: Sequence[str] = (), cell: int = 96, pad: int = 4,
                  label_width: int | None = None) -> Image.Image:
    """One row per tensor (n_i, 3, H, W); images upscaled (nearest) to `cell` pixels."""
    ncol = max(len(r) for r in rows)
    lw = (label_width if label_width is not None else
          (min(260, 8 + 7 * max(len(s) for s in row_labels)) if row_labels else 0))
    top = 18 if col_labels else 0
    W = lw + ncol * (cell + pad) + pad
    H = top + len(rows) * (cell + pad) + pad
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    for j, lab in enumerate(col_labels):
        draw.text((lw + pad + j * (cell + pad), 2), str(lab)[: cell // 6], fill="black", font=font)
    for i, row in enumerate(rows):
        y = top + pad + i * (cell + pad)
        if i < len(row_labels):
            _wrap(draw, row_labels[i], (4, y + 2), lw - 8, font)
        for j, img in enumerate(row):
            pil = to_pil(img).resize((cell, cell), Image.NEAREST)
            canvas.paste(pil, (lw + pad + j * (cell + pad), y))
    return canvas


def _wrap(draw: ImageDraw.ImageDraw, text: str, xy: tuple[int, int], width: int, font) -> None:
    """Greedy word wrap so long taxon names stay inside the label column."""
    x, y = xy
    line = ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) > width and line:
            draw.text((x, y), line, fill="black", font=font)
            y += 14
            line = word
        else:
            line = trial
    if line:
        draw.text((x, y), line, fill="black", font=font)


def uint8_from_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def mosaic(images: torch.Tensor, ncol: int) -> np.ndarray:
    """A plain (H', W', 3) uint8 mosaic, no labels (for quick previews)."""
    n, c, h, w = images.shape
    nrow = -(-n // ncol)
    out = np.full((nrow * h, ncol * w, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncol)
        out[r * h:(r + 1) * h, q * w:(q + 1) * w] = img.permute(1, 2, 0).cpu().numpy()
    return out
