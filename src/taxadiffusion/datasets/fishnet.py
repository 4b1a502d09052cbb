"""FishNet (Khan et al., ICCV 2023): `anns/{train,test}.csv`, per-image box files, the order table.

Columns used: `image, Folder, Class, Order, NewOrder, Family, Genus, species` (the released code's
plus `NewOrder`); ranks class..species, with kingdom Animalia and phylum Chordata as fixed upper
ranks (BioCLIP text). Rules, each counted in the report:
- `species` holds a binomial on FishBase rows and is EMPTY on iNat-sourced rows (about 55%): under
  the "drop" policy those are dropped as "missing species"; "keep" keeps them to genus level;
  "fill" gives "species: None" as the released code does. A binomial whose first word is not the
  `Genus` cell is dropped ("binomial disagrees with genus"; DataError under --strict).
- Order: `Order` can hold a slash ("A/B"); `NewOrder` is FishNet's cleaned value. Precedence: the
  family-to-order table when given (see below) > `NewOrder` > `Order`; every change is counted. An
  order still holding a slash after that is kept as written (a distinct taxon, as in the released
  code) and noted.
- Class: FishNet spells ray-finned fishes both `Actinopterygii` (iNat rows) and `Actinopteri`
  (FishBase rows). We use Actinopterygii, the spelling of iNaturalist, GBIF and the Catalogue of Life
  (BioCLIP's TreeOfLife text follows these); see CLASS_SYNONYMS.
- `Folder` must equal `Family` (FishNet files images by family); a mismatch is a DataError.
- Image path `<root>/<Folder>/<basename(image)>` (FishBase rows store URLs). Image id: the first,
  unnamed (pandas index) column when present, else the basename.
- Boxes: FishNet ships one `<stem>.txt` per image under `Images/<Family>/` (KITTI-like, one
  `Family x1 y1 x2 y2` line per box, pixels; faixan-khan/FishNet README). We look in `<boxes>/<Folder>/`
  when `boxes=` is given, else `<root>/<Folder>/` then `<root>/Images/<Folder>/`. Several boxes: the
  largest is used (the released code crops to one box per image; the largest is the main subject).
  No box file: the whole image is used. Non-numeric values are a DataError naming file, line, field.

The family-to-order table (`train_full_meta_new.csv`: Family, Order, Order_new) is optional:
`order_table=path`, or found automatically as `*full_meta_new.csv` beside the CSV or one folder up
(`order_table=False` turns that off). Preprocessing: "fishnet" (box crop, then 50% random square crop /
50% squash for training, centre square crop for evaluation).
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Literal, Sequence
from urllib.parse import urlparse

from .parsing import (clean, find_columns, read_delimited, reject, require_columns, select_ranks,
                      split_species)
from .table import DataError, RawRow, ReadReport, Table, build_table

RANKS = ("class", "order", "family", "genus", "species")
FIXED_UPPER = {"kingdom": "Animalia", "phylum": "Chordata"}
CLASS_SYNONYMS = {"Actinopteri": "Actinopterygii"}
ORDER_TABLE_GLOB = "*full_meta_new.csv"

Box = tuple[float, float, float, float]


def _is_order_table(header: Sequence[str]) -> bool:
    cols = find_columns(header, ["Family", "Order_new", "image"])
    return "Family" in cols and "Order_new" in cols and "image" not in cols


def read_order_table(path: str | os.PathLike) -> dict[str, str]:
    """Family -> order from FishNet's `train_full_meta_new.csv` (column Order_new, else Order)."""
    path = Path(path)
    header, rows = read_delimited(path)
    cols = find_columns(header, ["Family", "Order_new", "Order"])
    if "Family" not in cols or not ({"Order_new", "Order"} & cols.keys()):
        raise DataError(path, 1, "Family" if "Family" not in cols else "Order_new",
                        "not a FishNet family-to-order table (needs Family and Order_new or Order)")
    ocol = cols.get("Order_new", cols.get("Order"))
    table: dict[str, str] = {}
    first: dict[str, int] = {}
    for line, row in rows:
        fam, order = clean(row.get(cols["Family"])), clean(row.get(ocol))
        if not fam or not order:
            raise DataError(path, line, "Family" if not fam else ocol, "empty cell")
        if table.setdefault(fam, order) != order:
            raise DataError(path, line, ocol, f"family {fam!r} has order {order!r} here but "
                            f"{table[fam]!r} at line {first[fam]}")
        first.setdefault(fam, line)
    return table


def find_order_table(csv_path: str | os.PathLike) -> Path | None:
    """The family-to-order table beside the CSV or one folder up, if exactly one is there."""
    here = Path(os.path.abspath(csv_path)).parent  # abspath: keep the user's (symlinked) path
    for d in (here, here.parent):
        hits = sorted(p for p in d.glob(ORDER_TABLE_GLOB) if p.is_file())
        if len(hits) > 1:
            raise DataError(hits[1], None, None, f"several FishNet order tables in {d} "
                            f"({', '.join(h.name for h in hits)}): pass order_table= explicitly")
        if hits:
            return hits[0]
    return None


def read_boxes(path: Path) -> list[Box]:
    """Boxes (x1, y1, x2, y2) of one FishNet box file; DataError naming file, line, field."""
    boxes = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, None, None, f"cannot read the box file: {e}") from e
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 5:
            raise DataError(path, n, None, f"expected 'Family x1 y1 x2 y2', got {line.strip()!r}")
        vals = []
        for name, v in zip(("x1", "y1", "x2", "y2"), parts[-4:]):
            try:
                vals.append(float(v))
            except ValueError:
                raise DataError(path, n, name, f"box value {v!r} is not a number") from None
        boxes.append(tuple(vals))
    return boxes


def _basename(image: str) -> str:
    if "://" in image:
        return PurePosixPath(urlparse(image).path).name
    return PurePosixPath(image.replace("\\", "/")).name


def read_fishnet(metadata: str | os.PathLike, root: str | os.PathLike, *,
                 ranks: Sequence[str] | None = None, missing: str = "fill", strict: bool = False,
                 order_table: str | os.PathLike | None | Literal[False] = None,
                 boxes: str | os.PathLike | None = None, check_files: bool = True) -> Table:
    path = Path(metadata)
    model, upper = select_ranks("fishnet", RANKS, ranks, tuple(FIXED_UPPER))
    report = ReadReport("fishnet", [str(path)])
    header, rows = read_delimited(path, report, strict)
    if _is_order_table(header):
        raise DataError(path, 1, "image", "this is FishNet's family-to-order table (Family, Order, "
                        "Order_new), not image metadata: pass anns/train.csv or anns/test.csv as the "
                        "metadata; this table is picked up automatically beside that CSV, or pass "
                        "it as order_table=")
    cols = require_columns(path, header, ["image", "Class", "Order", "Family", "Genus", "species"],
                           "(FishNet anns/*.csv)")
    cols.update(find_columns(header, ["Folder", "NewOrder"]))
    id_col = header[0] if header and header[0] == "" else None
    table_path = None if order_table is False else (order_table or find_order_table(path))
    orders = read_order_table(table_path) if table_path else {}
    sources = [str(path)] + ([str(table_path)] if table_path else [])
    report.sources = sources
    root_p = Path(root)
    box_roots = [Path(boxes)] if boxes else [root_p, root_p / "Images"]

    def cell(row, key):
        return clean(row.get(cols[key])) if key in cols else None

    def order_of(row, family) -> str | None:
        raw, new = cell(row, "Order"), cell(row, "NewOrder")
        if family in orders:
            order, why = orders[family], "order from the family-to-order table"
        elif new:
            order, why = new, "order from NewOrder"
        else:
            order, why = raw, ""
        if order != raw:
            report.fixed[why] += 1
        if order and "/" in order:
            report.notes["order with '/' kept as written (no NewOrder or table entry)"] += 1
        return order

    def box_of(folder: str, stem: str) -> Box | None:
        for d in box_roots:
            p = d / folder / f"{stem}.txt"
            if p.is_file():
                found = read_boxes(p)
                if not found:
                    report.notes["box file without boxes (whole image used)"] += 1
                    return None
                if len(found) > 1:
                    report.notes["several boxes (the largest is used)"] += 1
                best = max(found, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
                if best[2] <= best[0] or best[3] <= best[1]:
                    report.notes["degenerate box ignored (whole image used)"] += 1
                    return None
                return best
        report.notes["no box file (whole image used)"] += 1
        return None

    def raws():
        for line, row in rows:
            image = (row.get(cols["image"]) or "").strip()
            family, folder = cell(row, "Family"), cell(row, "Folder")
            if folder and family and folder != family:
                raise DataError(path, line, cols["Folder"],
                                f"Folder {folder!r} differs from Family {family!r}")
            folder = folder or family
            if not image or not folder:
                reject(report, strict=strict, source=path, row=line,
                       field=cols["image"] if not image else cols["Family"],
                       problem="no image, or no Folder/Family to find it in",
                       reason="no image path")
                continue
            cls = cell(row, "Class")
            if cls in CLASS_SYNONYMS:
                report.fixed[f"class {cls} -> {CLASS_SYNONYMS[cls]}"] += 1
                cls = CLASS_SYNONYMS[cls]
            genus = cell(row, "Genus")
            epithet, genus2, problem = split_species(cell(row, "species"), genus)
            if problem:
                reject(report, strict=strict, source=path, row=line, field=cols["species"],
                       problem=problem, reason="binomial disagrees with genus")
                continue
            if genus2 != genus:
                report.fixed["genus taken from the binomial"] += 1
            names = {**FIXED_UPPER, "class": cls, "order": order_of(row, family),
                     "family": family, "genus": genus2, "species": epithet}
            base = _basename(image)
            image_id = (row.get(id_col) or "").strip() if id_col is not None else ""
            # rows the "drop" policy will drop need no box (and are not counted in box notes)
            dropped = missing == "drop" and any(not names[r] for r in model)
            box = None if dropped else box_of(folder, PurePosixPath(base).stem)
            yield RawRow(image_id or base, f"{folder}/{base}", names, str(path), line, box,
                         image_field=cols["image"])

    return build_table(raws(), fmt="fishnet", sources=sources, root=root, ranks=model,
                       preprocess="fishnet", missing=missing, strict=strict, upper_ranks=upper,
                       report=report, check_files=check_files)
