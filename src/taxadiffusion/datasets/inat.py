"""iNaturalist 2021: the COCO-style JSON ("inat2021") and the folder-name form ("inat-folders").

JSON (visipedia/inat_comp 2021/README.md): `images` (id, file_name), `categories` (id, kingdom,
phylum, class, order, family, genus, specific_epithet), `annotations` (image_id, category_id). Image
path: `<root>/<file_name>`, as the released code (REFERENCE-FACTS.md "Data handling"). test.json has
no annotations: it cannot be used for training and is refused with a message saying so.

Folders: every class folder is named `NNNNN_Kingdom_Phylum_Class_Order_Family_Genus_epithet` (the
category id, then the seven ranks; iNat names hold no underscore, so the name splits into exactly
eight parts). When an annotation's category id is not in `categories` (excerpts, hand-edited
files), the lineage is recovered from the image's folder name if the folder number equals the
category id (counted under report.fixed); otherwise the row is dropped with a counted reason
(DataError under --strict). Preprocessing: "inat" (random square crop along the long side for
training, centre crop for evaluation).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from ..taxonomy import ALL_RANKS
from .parsing import clean, json_text, read_json, reject, select_ranks, split_species
from .table import DataError, RawRow, ReadReport, Table, build_table

# JSON category key per canonical rank
CATEGORY_KEYS = dict(zip(ALL_RANKS, ("kingdom", "phylum", "class", "order", "family", "genus",
                                     "specific_epithet")))
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_FOLDER = re.compile(r"^(\d+)_(.+)$")


def parse_folder_name(name: str) -> tuple[int, tuple[str, ...]] | None:
    """(category id, 7 names) from `03938_Animalia_Chordata_Aves_..._Ptilotula_penicillata`, or None."""
    m = _FOLDER.match(name)
    if not m:
        return None
    parts = m.group(2).split("_")
    if len(parts) != len(ALL_RANKS) or any(not p for p in parts):
        return None
    return int(m.group(1)), tuple(parts)


def _names(lineage: Sequence[str | None]) -> dict[str, str | None]:
    return {r: clean(n) for r, n in zip(ALL_RANKS, lineage)}


def _int(rec: dict, key: str, path: Path, i: int, what: str) -> int:
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise DataError(path, i + 1, key, f"{what} record {i}: {key!r} must be an integer (the iNat "
                        f"2021 schema), got {type(v).__name__} {json.dumps(v)[:60]}")
    return v


_SINGULAR = {"images": "image", "categories": "category", "annotations": "annotation"}


def _objects(data: dict, key: str, path: Path) -> list[dict]:
    """data[key] as a list of objects, or a DataError naming the key (and the record)."""
    v, one = data[key], _SINGULAR[key]
    if not isinstance(v, list):
        got = "null" if v is None else f"a {type(v).__name__}"
        raise DataError(path, None, key, f"{key!r} is {got}; the iNat 2021 schema has a list of "
                        f"{one} objects there")
    for i, rec in enumerate(v):
        if not isinstance(rec, dict):
            raise DataError(path, i + 1, key, f"{one} record {i} is {type(rec).__name__} "
                            f"{json.dumps(rec)[:60]}, not an object")
    return v


def _check_keys(rec: dict, keys: Sequence[str], path: Path, i: int, what: str) -> None:
    absent = [k for k in keys if k not in rec]
    if absent:
        raise DataError(path, i + 1, absent[0], f"{what} record {i} has no {absent[0]!r}")


def read_inat2021(metadata: str | os.PathLike, root: str | os.PathLike, *,
                  ranks: Sequence[str] | None = None, missing: str = "fill",
                  strict: bool = False, check_files: bool = True) -> Table:
    """Every record is checked against the schema's types (ids int, file_name and rank names text,
    a null rank is missing): a wrong type is a DataError naming the record and the field. Two
    image records with one id: a DataError under --strict, else their annotations are dropped
    (counted); an identical repeat is only noted."""
    path = Path(metadata)
    model, upper = select_ranks("inat2021", ALL_RANKS, ranks)
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(path, None, None, "expected a JSON object with images, categories, annotations")
    for key in ("images", "categories"):
        if key not in data:
            raise DataError(path, None, key, f"missing or not a list: {key!r}")
    if "annotations" not in data:
        raise DataError(path, None, "annotations",
                        "the file has no annotations (like iNat 2021 test.json): images without "
                        "labels cannot be used for training; use train.json, train_mini.json or val.json")
    report = ReadReport("inat2021", [str(path)])

    categories: dict[int, dict[str, str | None]] = {}
    cat_row: dict[int, int] = {}
    for i, c in enumerate(_objects(data, "categories", path)):
        _check_keys(c, ("id", *CATEGORY_KEYS.values()), path, i, "category")
        cid = _int(c, "id", path, i, "category")
        names = {r: json_text(c[k], source=path, row=i + 1, field=k) for r, k in CATEGORY_KEYS.items()}
        if categories.setdefault(cid, names) != names:
            raise DataError(path, i + 1, "id", f"category id {cid} is also category record "
                            f"{cat_row[cid]} with another lineage; category ids must be unique")
        cat_row.setdefault(cid, i)
    images: dict[int, tuple[int, str]] = {}       # id -> (record index, file_name)
    twice: dict[int, tuple[int, str, int, str]] = {}  # id -> both records, when they differ
    for i, im in enumerate(_objects(data, "images", path)):
        _check_keys(im, ("id", "file_name"), path, i, "image")
        iid = _int(im, "id", path, i, "image")
        name = im["file_name"]
        if not isinstance(name, str) or not name.strip():
            raise DataError(path, i + 1, "file_name", f"image record {i}: 'file_name' must be a "
                            f"non-empty string (a path under the image root), got {json.dumps(name)[:60]}")
        first = images.setdefault(iid, (i, name))
        if first[0] != i:
            if first[1] == name:
                report.notes["image record repeated (identical, used once)"] += 1
                continue
            problem = (f"image id {iid} names two files: image record {first[0]} ({first[1]!r}) and "
                       f"image record {i} ({name!r}); image ids must be unique")
            if strict:
                raise DataError(path, i + 1, "id", problem)
            twice.setdefault(iid, (first[0], first[1], i, name))
    anns = _objects(data, "annotations", path)

    def raws():
        for i, ann in enumerate(anns):
            row = i + 1
            _check_keys(ann, ("image_id", "category_id"), path, i, "annotation")
            iid, cat = _int(ann, "image_id", path, i, "annotation"), _int(ann, "category_id", path, i,
                                                                            "annotation")
            if iid in twice:
                a, fa, b, fb = twice[iid]
                reject(report, strict=strict, source=path, row=row, field="image_id",
                       problem=f"annotation {i} points at image id {iid}, which names two files: "
                               f"image record {a} ({fa!r}) and image record {b} ({fb!r})",
                       reason="image id with two image records")
                continue
            if iid not in images:
                reject(report, strict=strict, source=path, row=row, field="image_id",
                       problem=f"annotation {i} points at image id {iid} "
                               f"which is not in 'images'", reason="annotation without image")
                continue
            file_name = images[iid][1]
            names = categories.get(cat)
            if names is None:
                folder = parse_folder_name(Path(file_name).parent.name)
                if folder is None or folder[0] != cat:
                    got = (f"its folder number {folder[0]} differs" if folder
                           else "its folder name is not NNNNN_Kingdom_..._epithet")
                    reject(report, strict=strict, source=path, row=row, field="category_id",
                           problem=f"category id {cat} is not in 'categories' and {got} "
                                   f"({file_name})", reason="unknown category id")
                    continue
                names = _names(folder[1])
                report.fixed["lineage from the folder name (category not listed)"] += 1
            # iNat stores the epithet already; a binomial here would be a hand-made file
            epithet, _, problem = split_species(names["species"], names["genus"])
            if problem:
                reject(report, strict=strict, source=path, row=row, field="specific_epithet",
                       problem=problem, reason="binomial disagrees with genus")
                continue
            yield RawRow(str(iid), file_name, {**names, "species": epithet}, str(path), row,
                         image_field="file_name")

    return build_table(raws(), fmt="inat2021", sources=[str(path)], root=root, ranks=model,
                       preprocess="inat", missing=missing, strict=strict, upper_ranks=upper,
                       report=report, check_files=check_files)


def read_inat_folders(metadata: str | os.PathLike | None, root: str | os.PathLike, *,
                      ranks: Sequence[str] | None = None, missing: str = "fill",
                      strict: bool = False, check_files: bool = True) -> Table:
    """Scan `metadata` (a directory of class folders; None: the image root itself)."""
    top = Path(metadata) if metadata is not None else Path(root)
    if not top.is_dir():
        raise DataError(top, None, None, "inat-folders expects a directory of "
                        "NNNNN_Kingdom_Phylum_Class_Order_Family_Genus_epithet folders")
    model, upper = select_ranks("inat-folders", ALL_RANKS, ranks)
    report = ReadReport("inat-folders", [str(top)])
    top_rel = os.path.relpath(top.resolve(), Path(root).resolve())
    entries = sorted(os.scandir(top), key=lambda e: e.name)
    folders = [e for e in entries if e.is_dir()]
    if len(folders) < len(entries):
        report.notes["files beside the class folders (ignored)"] += len(entries) - len(folders)
    if not folders:
        raise DataError(top, None, None, "no class folders found")

    def raws():
        for n, d in enumerate(tqdm(folders, desc="scan folders", unit="folder")):
            parsed = parse_folder_name(d.name)
            if parsed is None:
                raise DataError(Path(d.path), None, "folder name",
                                f"{d.name!r} is not NNNNN_Kingdom_Phylum_Class_Order_Family_Genus_epithet")
            names = _names(parsed[1])
            for f in sorted(os.scandir(d.path), key=lambda e: e.name):
                if not f.is_file() or Path(f.name).suffix.lower() not in IMAGE_SUFFIXES:
                    report.notes["non-image entries in class folders (ignored)"] += 1
                    continue
                yield RawRow(f"{d.name}/{f.name}", os.path.join(top_rel, d.name, f.name), names,
                             str(top), n + 1)

    return build_table(raws(), fmt="inat-folders", sources=[str(top)], root=root, ranks=model,
                       preprocess="inat", missing=missing, strict=strict, upper_ranks=upper,
                       report=report, check_files=check_files)
