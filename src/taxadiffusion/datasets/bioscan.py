"""BIOSCAN-1M (TSV/CSV) and BIOSCAN-5M (CSV, or the browser's JSON records) insect metadata.

Ranks class..species; kingdom (always Animalia) and phylum (the `phylum` column, Arthropoda when the
file has none) are upper ranks for the BioCLIP text. Missing ranks are empty or the literal
`not_classified` (../shared/formats/bioscan1m_official_metadata_columns.txt). `species` holds a
binomial ("Hydroporus striola"); the lineage stores the epithet and a first word that is not the
`genus` cell drops the row ("binomial disagrees with genus"; DataError under --strict).

BIOSCAN-1M image path: `<root>/part<chunk_number>/<image_file>` (the released code). Files without
`chunk_number` but with `image_tar` (`BIOSCAN_IMAGE_DATASET_V1_018_OF_20.tar`, as in the small
validation metadata) give the part from the tar's number (part18), counted under report.fixed.
Image id: processid, else sampleid, else image_file.

BIOSCAN-5M image path: `<root>/<split>/<chunk>/<processid>.jpg`, or `<root>/<split>/<processid>.jpg`
when chunk is empty (BIOSCAN-5M README). The CSV has `processid`; the browser's JSON list of records
(../shared/formats/bioscan5m_sample_metadata_excerpt.json) has `processid` and/or `id`; keys starting
with "_" (notes) are ignored. Preprocessing: "bioscan" (pad to square with white, as released).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator, Sequence

from .parsing import (clean, find_columns, json_text, read_delimited, read_json, reject,
                      require_columns, select_ranks, split_species)
from .table import DataError, RawRow, ReadReport, Table, build_table

RANKS = ("class", "order", "family", "genus", "species")
KINGDOM = "Animalia"
DEFAULT_PHYLUM = "Arthropoda"  # every BIOSCAN specimen is an insect
_TAR = re.compile(r"_(\d+)_OF_\d+\.tar$", re.IGNORECASE)
# the BIOSCAN-5M keys read (JSON values of other keys may be numbers or lists: not checked)
_TEXT_KEYS = frozenset({"processid", "id", "split", "chunk", "phylum", *RANKS})


def _names(get, source, line, report: ReadReport, strict: bool) -> dict[str, str | None] | None:
    """Rank names of one record (`get(name)` returns the raw cell); None if the row was rejected."""
    names = {"kingdom": KINGDOM, "phylum": clean(get("phylum")) or DEFAULT_PHYLUM}
    names.update({r: clean(get(r)) for r in RANKS[:-1]})
    epithet, genus, problem = split_species(clean(get("species")), names["genus"])
    if problem:
        reject(report, strict=strict, source=source, row=line, field="species", problem=problem,
               reason="binomial disagrees with genus")
        return None
    if genus != names["genus"]:
        report.fixed["genus taken from the binomial"] += 1
    names["genus"], names["species"] = genus, epithet
    return names


def read_bioscan1m(metadata: str | os.PathLike, root: str | os.PathLike, *,
                   ranks: Sequence[str] | None = None, missing: str = "fill",
                   strict: bool = False, check_files: bool = True) -> Table:
    path = Path(metadata)
    model, upper = select_ranks("bioscan1m", RANKS, ranks, ("kingdom", "phylum"))
    report = ReadReport("bioscan1m", [str(path)])
    header, rows = read_delimited(path, report, strict)
    cols = require_columns(path, header, [*_need(model), "image_file"], "(BIOSCAN-1M metadata)")
    cols.update(find_columns(header, ["phylum", "chunk_number", "image_tar", "processid", "sampleid"]))
    if "chunk_number" not in cols and "image_tar" not in cols:
        raise DataError(path, 1, "chunk_number", "missing column chunk_number (images are in "
                        "part<chunk_number>/) and no image_tar column to derive it from")

    def raws() -> Iterator[RawRow]:
        for line, row in rows:
            def get(k):
                return row.get(cols[k]) if k in cols else None
            names = _names(get, path, line, report, strict)
            if names is None:
                continue
            image_file = clean(get("image_file"))
            if not image_file:
                raise DataError(path, line, cols["image_file"], "empty image_file")
            chunk = clean(get("chunk_number"))
            if chunk is None:
                tar = clean(get("image_tar")) or ""
                m = _TAR.search(tar)
                if not m:
                    field = cols.get("chunk_number", cols.get("image_tar"))
                    raise DataError(path, line, field, f"no chunk_number and image_tar {tar!r} "
                                    f"is not BIOSCAN_IMAGE_DATASET_V1_NNN_OF_NN.tar")
                chunk = str(int(m.group(1)))
                report.fixed["part folder from image_tar"] += 1
            elif not chunk.isdigit():
                raise DataError(path, line, cols["chunk_number"], f"chunk_number {chunk!r} is not a number")
            image_id = clean(get("processid")) or clean(get("sampleid")) or image_file
            yield RawRow(image_id, f"part{int(chunk)}/{image_file}", names, str(path), line,
                         image_field=cols["image_file"])

    return build_table(raws(), fmt="bioscan1m", sources=[str(path)], root=root, ranks=model,
                       preprocess="bioscan", missing=missing, strict=strict, upper_ranks=upper,
                       report=report, check_files=check_files)


def _need(model: Sequence[str]) -> list[str]:
    """Rank columns a file must have: the modelled ranks, and genus whenever species is modelled."""
    return [r for r in RANKS if r in model or (r == "genus" and "species" in model)]


def _records_5m(path: Path, need: Sequence[str], report: ReadReport,
                strict: bool) -> tuple[Iterator[tuple[int, dict]], str]:
    """(row number, record with lower-case keys and text values) pairs from the CSV or the JSON
    list, and the unit name for errors.

    JSON records leave out empty fields (a record without `species` is a missing species), so only
    the CSV must have every needed column. JSON values must be text (numbers only for `chunk`):
    a list or an object as a name is a DataError naming the record and key, and so are two keys
    that differ only in case (`genus` and `Genus`) with different values."""
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if path.suffix.lower() == ".json" or head.startswith(b"["):
        data = read_json(path)
        if not isinstance(data, list):
            raise DataError(path, None, None, "expected a JSON list of records")
        def it():
            for i, rec in enumerate(data):
                if not isinstance(rec, dict):
                    raise DataError(path, i + 1, None, f"record {i} is a {type(rec).__name__}, "
                                    f"not an object")
                out: dict[str, str | None] = {}
                for k, v in rec.items():
                    key = k.strip().lower()
                    if k.startswith("_") or key not in _TEXT_KEYS:
                        continue  # notes, and fields we do not read (numbers, barcodes, ...)
                    v = json_text(v, source=path, row=i + 1, field=key, integers=key == "chunk")
                    if key in out and out[key] != v:
                        raise DataError(path, i + 1, key, f"two keys for {key!r} in record {i} "
                                        f"with different values ({out[key]!r}, {v!r}); keep one")
                    out[key] = v
                yield i + 1, out
        return it(), "record"
    header, rows = read_delimited(path, report, strict)
    require_columns(path, header, ["processid", "split", *need], "(BIOSCAN-5M metadata)")

    def lowered():  # find_columns' case-insensitive match; the first of two spellings wins
        for n, row in rows:
            out: dict[str, str] = {}
            for k, v in row.items():
                out.setdefault(k.strip().lower(), v)
            yield n, out
    return lowered(), "row"


def read_bioscan5m(metadata: str | os.PathLike, root: str | os.PathLike, *,
                   ranks: Sequence[str] | None = None, missing: str = "fill",
                   strict: bool = False, check_files: bool = True) -> Table:
    path = Path(metadata)
    model, upper = select_ranks("bioscan5m", RANKS, ranks, ("kingdom", "phylum"))
    report = ReadReport("bioscan5m", [str(path)])
    records, unit = _records_5m(path, _need(model), report, strict)

    def raws() -> Iterator[RawRow]:
        for n, lower in records:
            names = _names(lower.get, path, n, report, strict)
            if names is None:
                continue
            pid = clean(lower.get("processid")) or clean(lower.get("id"))
            if not pid:
                raise DataError(path, n, "processid", f"{unit} {n - 1 if unit == 'record' else n} "
                                f"has no image id (processid or id)")
            split = clean(lower.get("split"))
            if not split:
                raise DataError(path, n, "split", f"no split for {pid} (images are in <split>/<chunk>/)")
            chunk = clean(lower.get("chunk"))
            if chunk is None:
                report.notes["no chunk (image at <split>/<processid>.jpg)"] += 1
            rel = f"{split}/{chunk}/{pid}.jpg" if chunk else f"{split}/{pid}.jpg"
            yield RawRow(pid, rel, names, str(path), n, image_field="processid")

    return build_table(raws(), fmt="bioscan5m", sources=[str(path)], root=root, ranks=model,
                       preprocess="bioscan", missing=missing, strict=strict, upper_ranks=upper,
                       report=report, check_files=check_files)
