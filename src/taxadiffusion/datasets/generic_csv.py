"""Generic CSV metadata: `file_name` plus one column per rank (e.g. ../shared/data/cub-birds).

Columns (matched case-insensitively): `file_name` (image path relative to the image root), any of
`kingdom, phylum, class, order, family, genus` and `species` or `specific_epithet` (the
iNaturalist-2021 name). A species cell may hold a binomial ("Phoebastria nigripes") or the epithet
alone ("nigripes"); the lineage stores the epithet (identity is the path: genus + epithet). An optional
`image_id` column names each image; otherwise the file name is its id. Tab-separated files work too.
The format's ranks are the rank columns present; ranks above the modelled ones become upper ranks
(BioCLIP text). Preprocessing: centre square crop.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..taxonomy import ALL_RANKS
from .parsing import clean, find_columns, read_delimited, reject, select_ranks, split_species
from .table import DataError, RawRow, ReadReport, Table, build_table

SPECIES_COLUMNS = ("species", "specific_epithet")


def read_csv(metadata: str | os.PathLike | None, root: str | os.PathLike, *,
             ranks: Sequence[str] | None = None, missing: str = "fill", strict: bool = False,
             check_files: bool = True) -> Table:
    """Read a generic CSV; `metadata=None` means `<root>/metadata.csv`."""
    path = Path(metadata) if metadata is not None else Path(root) / "metadata.csv"
    report = ReadReport("csv", [str(path)])
    header, rows = read_delimited(path, report, strict)
    cols = find_columns(header, ["file_name", "image_id", *ALL_RANKS[:-1], *SPECIES_COLUMNS])
    if "file_name" not in cols:
        raise DataError(path, 1, "file_name", "missing column 'file_name' (the image path relative "
                        f"to the image root); the header has: {', '.join(h for h in header if h)}")
    species_col = next((cols[c] for c in SPECIES_COLUMNS if c in cols), None)
    if "species" in cols and "specific_epithet" in cols:
        raise DataError(path, 1, "specific_epithet",
                        "both 'species' and 'specific_epithet' columns: keep one")
    available = [r for r in ALL_RANKS if r in cols or (r == "species" and species_col)]
    if not available:
        raise DataError(path, 1, "kingdom", "no rank column; expected some of "
                        f"{', '.join(ALL_RANKS[:-1])} and species or specific_epithet")
    model, upper = select_ranks("csv", available, ranks)

    def raws():
        for line, row in rows:
            names: dict[str, str | None] = {r: clean(row.get(cols[r])) for r in available if r != "species"}
            if species_col:
                epithet, genus, problem = split_species(clean(row.get(species_col)), names.get("genus"))
                if problem:
                    reject(report, strict=strict, source=path, row=line, field=species_col,
                           problem=problem, reason="binomial disagrees with genus")
                    continue
                if genus != names.get("genus") and "genus" in available:
                    report.fixed["genus taken from the binomial"] += 1
                names["species"], names["genus"] = epithet, genus
            file_name = (row.get(cols["file_name"]) or "").strip()
            if not file_name:
                reject(report, strict=strict, source=path, row=line, field=cols["file_name"],
                       problem="empty file_name", reason="no image file name")
                continue
            image_id = (row.get(cols["image_id"]) or "").strip() if "image_id" in cols else ""
            yield RawRow(image_id or file_name, file_name, names, str(path), line,
                         image_field=cols["file_name"])

    return build_table(raws(), fmt="csv", sources=[str(path)], root=root, ranks=model,
                       preprocess="center", missing=missing, strict=strict, upper_ranks=upper,
                       report=report, check_files=check_files)
