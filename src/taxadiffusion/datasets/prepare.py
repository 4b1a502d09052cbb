"""`taxadiffusion prepare`: read and validate metadata, print what was used and what was not, write
`taxonomy.json`, `table.csv`, `report.json` and optionally `preview.png` (a few images per family).

The summary is the user's one look at their data before a long run: images, taxa per rank, few-shot
species (paper Sec. 4.4: at most 5 training images), rows read and dropped by reason (missing image
files and ragged rows included), what was filled, truncated, fixed or noted, and the first warnings
(all of them are in report.json).
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from ..taxonomy import FEW_SHOT_MAX, Taxonomy
from . import read_table
from .table import Table

SHOW_WARNINGS = 5


def _counts(c) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) or "-"


def summary(table: Table, taxonomy: Taxonomy) -> list[str]:
    """The lines `prepare` prints."""
    r = table.report
    lines = [
        f"format {r.format}: {', '.join(r.sources)}",
        f"  rows read {r.rows_read}, used {len(table.records)}, dropped {r.rows_dropped}",
        f"  images {len(table.records)} (under {table.root}; preprocessing {table.preprocess!r})",
        "  taxa per rank: " + ", ".join(f"{k} {v}" for k, v in taxonomy.summary().items()),
        f"  few-shot species (<= {FEW_SHOT_MAX} images): {len(taxonomy.few_shot_species())}",
        f"  dropped: {_counts(r.dropped)}"
        + ("  (--missing-ranks keep|fill would use rows missing a rank)"
           if any(k.startswith("missing ") for k in r.dropped) else ""),
        f"  filled 'None': {_counts(r.filled)}; kept above a missing rank: {_counts(r.truncated)}",
        f"  fixed: {_counts(r.fixed)}",
        f"  notes: {_counts(r.notes)}",
        f"  warnings: {len(r.warnings)}",
    ]
    lines += [f"    {w}" for w in r.warnings[:SHOW_WARNINGS]]
    if len(r.warnings) > SHOW_WARNINGS:
        lines.append(f"    ... and {len(r.warnings) - SHOW_WARNINGS} more (all in report.json)")
    return lines


def write_preview(table: Table, taxonomy: Taxonomy, path: str | os.PathLike, *,
                  groups: int = 12, per_group: int = 6, tile: int = 96) -> int:
    """A grid: one row per family (the most imaged ones), images spread over its species, labelled
    with the family and its order. Evaluation preprocessing, so it shows what the model sees.
    Unreadable images show as grey tiles marked "unreadable". Returns the number of rows drawn."""
    from PIL import Image, ImageDraw, ImageFont

    from .images import PREPROCESS, load_image

    rank = "family" if "family" in table.ranks else table.ranks[max(0, len(table.ranks) - 2)]
    level = table.ranks.index(rank)
    by_group: dict[tuple, dict[tuple, list]] = defaultdict(lambda: defaultdict(list))
    for r in table.records:
        if len(r.lineage) > level:
            by_group[r.lineage[: level + 1]][r.lineage].append(r)
    chosen = sorted(by_group, key=lambda g: (-sum(map(len, by_group[g].values())), g))[:groups]
    if not chosen:
        return 0
    label_w, pad = 250, 4
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=11)
    sheet = Image.new("RGB", (label_w + per_group * (tile + pad), len(chosen) * (tile + pad) + pad),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    fn = PREPROCESS[table.preprocess]
    for row, g in enumerate(chosen):
        # round-robin over the group's species, so a row shows several species when it has them
        pools = [list(v) for _, v in sorted(by_group[g].items())]
        picks = []
        while len(picks) < per_group and any(pools):
            for p in pools:
                if p and len(picks) < per_group:
                    picks.append(p.pop(0))
        y = pad + row * (tile + pad)
        parent = f"{table.ranks[level - 1]}: {g[-2]}" if level else ""
        draw.text((6, y + tile // 2 - 18), f"{rank}: {g[-1]}", fill=(0, 0, 0), font=font)
        n_img = sum(map(len, by_group[g].values()))
        n_leaf = sum(len(lin) == len(table.ranks) for lin in by_group[g])  # "keep" rows stop higher
        draw.text((6, y + tile // 2 + 2), f"{parent}  ({n_img} img, {n_leaf} {table.ranks[-1]})".strip(),
                  fill=(90, 90, 90), font=small)
        for col, rec in enumerate(picks):
            x = label_w + col * (tile + pad)
            try:
                im = fn(load_image(rec.path), rec.box, tile, None)
            except Exception:  # a preview must not fail on one bad file; it shows it instead
                im = Image.new("RGB", (tile, tile), (160, 160, 160))
                ImageDraw.Draw(im).text((8, tile // 2 - 6), "unreadable", fill=(255, 255, 255), font=small)
            sheet.paste(im, (x, y))
    sheet.save(path)
    return len(chosen)


def prepare(fmt: str, metadata: str | os.PathLike | None, *, images: str | os.PathLike,
            out: str | os.PathLike = "prepared", ranks: Sequence[str] | None = None,
            missing: str = "fill", strict: bool = False, preview: bool = False,
            check_images: bool = False, check_files: bool = True, verbose: bool = True,
            **options: Any) -> tuple[Table, Taxonomy]:
    """Read, validate, summarise and write the prepared folder; returns (table, taxonomy).

    Every image file is looked up (one stat each) unless `check_files` is False; `check_images`
    also decodes every image (parallel, with a progress bar)."""
    table = read_table(fmt, metadata, images, ranks=ranks, missing=missing, strict=strict,
                       check_files=check_files, **options)
    bad: list[tuple[str, str]] = []
    if check_images:
        from .images import check_images as _check_images
        table, bad = _check_images(table)
    taxonomy = table.taxonomy()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    taxonomy.save(out / "taxonomy.json")
    table.write_csv(out / "table.csv")
    report = {**table.report.to_dict(), "ranks": list(table.ranks),
              "upper_ranks": list(table.upper_ranks), "preprocess": table.preprocess,
              "images": len(table.records), "taxa": taxonomy.summary(),
              "few_shot_species": len(taxonomy.few_shot_species()),
              "image_files_checked": bool(check_files), "images_checked": bool(check_images),
              "unreadable_images": [{"path": p, "error": e} for p, e in bad]}
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    lines = summary(table, taxonomy)
    missing_files = table.report.dropped.get("image file missing", 0)
    files = (f"image files missing: {missing_files} (dropped; listed in the warnings)" if check_files
             else "image files not looked up")
    lines.insert(3, f"  {files}; " + (f"unreadable images: {len(bad)} (dropped; listed in "
                                      f"report.json)" if check_images
                                      else "images not decoded (--check-images counts unreadable ones)"))
    written = ["taxonomy.json", "table.csv", "report.json"]
    if preview:
        write_preview(table, taxonomy, out / "preview.png")
        written.append("preview.png")
    lines.append(f"wrote {', '.join(str(out / w) for w in written)}")
    if verbose:
        print("\n".join(lines))
    return table, taxonomy
