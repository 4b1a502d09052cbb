"""Metadata readers: one module per format, each returning a validated `Table` (datasets/table.py).

READERS maps a format name to its reader `read_xxx(metadata, root, *, ranks=None, missing="fill",
strict=False, check_files=True) -> Table`. Image loading and preprocessing (torch) live in datasets/images.py and are
not imported here, so the CLI can list formats without importing torch.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from ..taxonomy import ALL_RANKS
from . import bioscan, fishnet
from .bioscan import read_bioscan1m, read_bioscan5m
from .fishnet import read_fishnet, read_order_table
from .generic_csv import read_csv
from .inat import read_inat2021, read_inat_folders
from .table import DataError, RawRow, ReadReport, Record, Table, build_table

READERS: dict[str, Callable[..., Table]] = {
    "inat2021": read_inat2021,        # COCO-style JSON (train/val/train_mini.json)
    "inat-folders": read_inat_folders,  # NNNNN_Kingdom_..._epithet/ class folders
    "fishnet": read_fishnet,          # FishNet anns/*.csv (+ box files, + family-to-order table)
    "bioscan1m": read_bioscan1m,      # BIOSCAN-1M TSV/CSV
    "bioscan5m": read_bioscan5m,      # BIOSCAN-5M CSV or browser JSON records
    "csv": read_csv,                  # file_name + one column per rank
}

# The ranks each format can model (`ranks=` picks a subsequence), and the upper ranks it fixes or
# records above them for the BioCLIP text. A generic CSV has the rank columns it has.
FORMAT_RANKS: dict[str, tuple[str, ...] | None] = {
    "inat2021": ALL_RANKS, "inat-folders": ALL_RANKS, "fishnet": fishnet.RANKS,
    "bioscan1m": bioscan.RANKS, "bioscan5m": bioscan.RANKS, "csv": None,
}
FORMAT_UPPER_RANKS: dict[str, tuple[str, ...]] = {
    "inat2021": (), "inat-folders": (), "fishnet": ("kingdom", "phylum"),
    "bioscan1m": ("kingdom", "phylum"), "bioscan5m": ("kingdom", "phylum"), "csv": (),
}


def read_table(fmt: str, metadata: str | os.PathLike | None, root: str | os.PathLike, *,
               ranks: Sequence[str] | None = None, missing: str = "fill", strict: bool = False,
               check_files: bool = True, **options: Any) -> Table:
    """Read `metadata` in format `fmt`; `options` go to the reader (e.g. FishNet's order_table=).

    For "csv" `metadata=None` means `<root>/metadata.csv`; for "inat-folders" it means the root.
    `check_files`: drop (count, list) rows whose image file does not exist; an error under strict.
    """
    if fmt not in READERS:
        raise ValueError(f"unknown metadata format {fmt!r}; known formats: {', '.join(sorted(READERS))}")
    if root is None:  # the config's data.root, prepare's --images
        raise ValueError(f"format {fmt!r}: no image root given; set data.root=/path/to/images (train) "
                         f"or --images ROOT (prepare)")
    if metadata is None and fmt not in ("csv", "inat-folders"):
        raise ValueError(f"format {fmt!r} needs a metadata file: set data.metadata=/path/to/file "
                         f"(train) or give it to prepare")
    return READERS[fmt](metadata, root, ranks=ranks, missing=missing, strict=strict,
                        check_files=check_files, **options)


__all__ = ["READERS", "FORMAT_RANKS", "FORMAT_UPPER_RANKS", "read_table", "read_order_table", "DataError", "RawRow", "ReadReport", "Record",
           "Table", "build_table"]
