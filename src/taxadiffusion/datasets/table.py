"""The validated table every reader returns, the missing-rank policy, and the checks all formats share.

Readers (one module per metadata format) turn a file into `RawRow`s: the names they found per rank,
the image path, an optional box, and where the row came from. `build_table` applies the one policy for
missing ranks, checks what every format must satisfy (unique image ids, paths inside the image root,
image files that exist, names without the lineage separator, one parent per name, one spelling per
name) and returns a `Table` whose `report` counts everything that was not used as is.
Nothing is dropped without a reason in `report.dropped`.
"""
from __future__ import annotations

import csv
import os
import stat
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ..taxonomy import ALL_RANKS, LINEAGE_SEPARATOR, NONE_NAME, Taxonomy

# drop: a row missing any modelled rank is dropped (counted per rank).
# keep: the row is kept for the levels above its first missing rank (it trains those stages only).
# fill: a missing rank becomes the name "None", as the released code does ("<rank>: None").
MISSING_POLICIES = ("drop", "keep", "fill")
# Missing image files are all counted; only this many are listed one by one (a wrong --images
# would otherwise put millions of lines into report.json).
LIST_MISSING_FILES = 1000


class DataError(ValueError):
    """Malformed input. The message names the file, the row and the field."""

    def __init__(self, source: str | os.PathLike, row: int | None, field: str | None, problem: str):
        where = str(source)
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {problem}")
        self.source, self.row, self.field, self.problem = str(source), row, field, problem


@dataclass(frozen=True)
class RawRow:
    """What a reader found in one row, before any policy. `names` maps canonical rank -> name or None."""

    image_id: str
    image: str                       # path relative to the image root (or absolute under it)
    names: dict[str, str | None]
    source: str
    row: int                         # 1-based data row (CSV/TSV: line number; JSON: record index)
    box: tuple[float, float, float, float] | None = None
    image_field: str = "image"       # the column/key the image path came from, for messages


@dataclass(frozen=True)
class Record:
    """One usable image: absolute path, lineage aligned with the table's ranks (maybe shorter)."""

    image_id: str
    path: str
    lineage: tuple[str, ...]
    source: str
    row: int
    box: tuple[float, float, float, float] | None = None


@dataclass
class ReadReport:
    """Everything a user must know about what was read and what was not used."""

    format: str
    sources: list[str]
    rows_read: int = 0
    dropped: Counter = field(default_factory=Counter)      # reason -> rows
    filled: Counter = field(default_factory=Counter)       # rank -> rows with "None" filled in
    truncated: Counter = field(default_factory=Counter)    # rank -> rows kept only above this rank
    fixed: Counter = field(default_factory=Counter)        # what the reader repaired -> rows
    notes: Counter = field(default_factory=Counter)        # rows used as they are, worth knowing
    warnings: list[str] = field(default_factory=list)

    @property
    def rows_dropped(self) -> int:
        return sum(self.dropped.values())

    def to_dict(self) -> dict:
        return {"format": self.format, "sources": self.sources, "rows_read": self.rows_read,
                "rows_dropped": self.rows_dropped, "dropped": dict(self.dropped),
                "filled": dict(self.filled), "truncated": dict(self.truncated),
                "fixed": dict(self.fixed), "notes": dict(self.notes), "warnings": self.warnings}


@dataclass
class Table:
    """The validated image table: records, the modelled ranks, the preprocessing kind, the report."""

    records: list[Record]
    ranks: tuple[str, ...]
    preprocess: str                 # key of datasets.images.PREPROCESS
    report: ReadReport
    root: str
    upper_ranks: tuple[str, ...] = ()
    upper: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def taxonomy(self, species_prompt: str = "binomial") -> Taxonomy:
        return Taxonomy(self.ranks, (r.lineage for r in self.records), upper=self.upper,
                        upper_ranks=self.upper_ranks, species_prompt=species_prompt)

    def write_csv(self, path: str | Path) -> None:
        """The normalised table: one row per record, one column per modelled rank, box and origin."""
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image_id", "path", *self.ranks, "box", "source", "row"])
            for r in self.records:
                lin = list(r.lineage) + [""] * (len(self.ranks) - len(r.lineage))
                box = " ".join(f"{v:g}" for v in r.box) if r.box else ""
                w.writerow([r.image_id, r.path, *lin, box, r.source, r.row])


class _Files:
    """Image paths under the root, each resolved and checked with one lstat.

    Resolving every path (Path.resolve: an lstat per path component) took 40 us a row, over a
    minute for iNat's 2.7M rows; directories repeat, so each is resolved once and a file costs one
    lstat (existence, and whether it is a symlink that must be followed to stay inside the root)."""

    def __init__(self, root: Path, check: bool):
        self.root, self.check = root, check
        self.dirs: dict[str, str | None] = {}

    def _resolve(self, p: str) -> str | None:
        real = os.path.realpath(p)
        inside = real == str(self.root) or real.startswith(str(self.root).rstrip(os.sep) + os.sep)
        return real if inside else None

    def __call__(self, rel: str) -> tuple[str | None, bool]:
        """(absolute path, or None when it escapes the root; whether the file exists)."""
        d, name = os.path.split(rel)
        if name in ("", ".", ".."):  # not a file name: resolve the whole path
            real = self._resolve(os.path.join(self.root, rel))
            return real, real is not None and (not self.check or os.path.isfile(real))
        if d not in self.dirs:
            self.dirs[d] = self._resolve(os.path.join(self.root, d))
        if self.dirs[d] is None:
            return None, False
        p = os.path.join(self.dirs[d], name)
        if not self.check:
            return self._resolve(p) if os.path.islink(p) else p, True
        try:
            st = os.lstat(p)
        except OSError:
            return p, False
        if stat.S_ISLNK(st.st_mode):
            p = self._resolve(p)
            return p, p is not None and os.path.isfile(p)
        return p, stat.S_ISREG(st.st_mode)


def _spelling_key(name: str) -> str:
    return unicodedata.normalize("NFKC", name).casefold()


def _spelling_difference(a: str, b: str) -> str:
    if unicodedata.normalize("NFC", a) == unicodedata.normalize("NFC", b):
        return "Unicode normal form (NFC/NFD: the same letters, encoded differently)"
    if unicodedata.normalize("NFKC", a) == unicodedata.normalize("NFKC", b):
        return "Unicode compatibility form (NFKC: e.g. full-width or ligature letters)"
    if a.casefold() == b.casefold() or _spelling_key(a) == _spelling_key(b):
        return "case" if a.lower() == b.lower() else "case and Unicode form"
    return "spelling"


def _where(raw: RawRow, field: str | None) -> str:
    return f"{raw.source}, row {raw.row}" + (f", field {field!r}" if field else "")


def build_table(
    rows: Iterable[RawRow],
    *,
    fmt: str,
    sources: Sequence[str],
    root: str | os.PathLike,
    ranks: Sequence[str],
    preprocess: str,
    missing: str = "fill",
    strict: bool = False,
    upper_ranks: Sequence[str] = (),
    report: ReadReport | None = None,
    check_files: bool = True,
) -> Table:
    """Apply the missing-rank policy and the shared checks; see the module docstring.

    `ranks` are the modelled ranks; `upper_ranks` are ranks above them whose names travel with the
    taxonomy for the BioCLIP text only. Errors (`DataError`) name the file, row and field.
    `check_files`: a used row whose image file does not exist is dropped ("image file missing",
    listed in the warnings) or, under `strict`, a DataError. Names holding the lineage separator
    " > " are always refused (the taxon could be trained but never looked up for sampling); two
    spellings of one name that differ only in case or Unicode form are a warning (error under
    `strict`): they stay two taxa, which is right only if they are two taxa.
    """
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing-rank policy must be one of {MISSING_POLICIES}, got {missing!r}")
    ranks = tuple(ranks)
    for r in (*upper_ranks, *ranks):
        if r not in ALL_RANKS:
            raise ValueError(f"unknown rank {r!r}; known ranks: {ALL_RANKS}")
    report = report or ReadReport(fmt, [str(s) for s in sources])
    root_p = Path(root).resolve()
    records: list[Record] = []
    seen_ids: dict[str, RawRow] = {}
    # name at level l -> {parent path: first row}, to report names placed under two parents
    parents: list[dict[str, dict[tuple, RawRow]]] = [defaultdict(dict) for _ in ranks]
    upper: dict[str, tuple[str, ...]] = {}
    upper_first: dict[str, RawRow] = {}
    files = _Files(root_p, check_files)
    # (level, parent path, normalised name) -> (first spelling, its row): spellings that collide
    spellings: dict[tuple, tuple[str, RawRow]] = {}
    seen_paths: set[tuple[str, ...]] = set()
    missing_files = 0

    for raw in rows:
        report.rows_read += 1
        if raw.image_id in seen_ids:
            first = seen_ids[raw.image_id]
            raise DataError(raw.source, raw.row, "image id",
                            f"duplicate image id {raw.image_id!r} (first at row {first.row})")
        seen_ids[raw.image_id] = raw
        path, exists = files(raw.image)
        if path is None:
            raise DataError(raw.source, raw.row, raw.image_field,
                            f"path {raw.image!r} escapes the image root {root_p}")
        for r in (*upper_ranks, *ranks):
            name = raw.names.get(r)
            if name is not None and not isinstance(name, str):
                raise DataError(raw.source, raw.row, r, f"a name must be text, got "
                                f"{type(name).__name__} {name!r:.60}")
            if name and LINEAGE_SEPARATOR in name:
                raise DataError(raw.source, raw.row, r, f"the name {name!r} holds the lineage "
                                f"separator {LINEAGE_SEPARATOR!r} (a taxon named so could be trained "
                                f"but never looked up by lineage for sampling); rename it in the metadata")

        # -- missing ranks -----------------------------------------------------------------
        lineage: list[str] = []
        dropped_reason = None
        for r in ranks:
            name = raw.names.get(r)
            name = name.strip() if isinstance(name, str) else None
            if name and name != NONE_NAME:
                if missing == "keep" and len(lineage) < ranks.index(r):
                    continue  # below a gap: not used (counted at the gap)
                lineage.append(name)
                continue
            if missing == "drop":
                dropped_reason = f"missing {r}"
                break
            if missing == "fill":
                lineage.append(NONE_NAME)
                report.filled[r] += 1
            elif len(lineage) == ranks.index(r):  # keep: the first gap ends the lineage
                report.truncated[r] += 1
        if dropped_reason:
            report.dropped[dropped_reason] += 1
            continue
        if not lineage:
            report.dropped[f"missing {ranks[0]}"] += 1
            continue
        if not exists:  # checked only for rows the policy keeps: one lstat per used row
            problem = (f"image file {path} does not exist (from {raw.image!r}); is --images the "
                       f"folder the paths are relative to?")
            if strict:
                raise DataError(raw.source, raw.row, raw.image_field, problem)
            report.dropped["image file missing"] += 1
            missing_files += 1
            if missing_files <= LIST_MISSING_FILES:
                report.warnings.append(f"{_where(raw, raw.image_field)}: {problem}; row dropped")
            continue

        # -- one spelling per name (checked once per new path: the number of taxa, not rows) -------
        for level in range(len(lineage)):
            p = tuple(lineage[: level + 1])
            if p in seen_paths:
                continue
            seen_paths.add(p)
            name = lineage[level]
            key = (level, p[:-1], _spelling_key(name))
            first = spellings.setdefault(key, (name, raw))
            if first[0] != name:
                msg = (f"{ranks[level]} {name!r} and {first[0]!r} (first at {first[1].source} row "
                       f"{first[1].row}) differ only in {_spelling_difference(name, first[0])}; they "
                       f"are kept as two taxa: use one spelling in the metadata")
                if strict:
                    raise DataError(raw.source, raw.row, ranks[level], msg)
                report.warnings.append(f"{_where(raw, ranks[level])}: {msg}")

        # -- one parent per name (identity is the path; a reuse is reported) ------------------
        for level in range(1, len(lineage)):
            name = lineage[level]
            if ranks[level] == "species" or name == NONE_NAME:
                continue  # an epithet is only meaningful with its genus
            seen = parents[level][name]
            parent = tuple(lineage[:level])
            if parent not in seen:
                seen[parent] = raw
                if len(seen) == 2:
                    (p0, r0), = [(p, r) for p, r in seen.items() if p != parent]
                    msg = (f"{ranks[level]} {name!r} is placed under two different "
                           f"{ranks[level - 1]} taxa: {p0[-1]!r} (first at {r0.source} row {r0.row}) "
                           f"and {parent[-1]!r}; they are kept as two taxa")
                    if strict:
                        raise DataError(raw.source, raw.row, ranks[level], msg)
                    report.warnings.append(f"{raw.source}, row {raw.row}, field {ranks[level]!r}: {msg}")
        if upper_ranks:
            up = tuple((raw.names.get(r) or "").strip() for r in upper_ranks)
            prev = upper.setdefault(lineage[0], up)
            if prev != up and lineage[0] not in upper_first:
                upper_first[lineage[0]] = raw
                report.warnings.append(
                    f"{raw.source}, row {raw.row}, field {upper_ranks[-1]!r}: {ranks[0]} "
                    f"{lineage[0]!r} appears under {' '.join(prev)!r} and {' '.join(up)!r}; "
                    f"the first is used for the BioCLIP text")
        records.append(Record(raw.image_id, path, tuple(lineage), raw.source, raw.row, raw.box))

    if missing_files > LIST_MISSING_FILES:
        report.warnings.append(f"... and {missing_files - LIST_MISSING_FILES} more missing image "
                               f"files (all counted under dropped)")
    if not records:
        hint = ""
        if missing_files:
            hint = (f"; none of the {missing_files} image files exist under {root_p}: is --images "
                    f"the folder the metadata's paths are relative to?")
        raise DataError(sources[0] if sources else fmt, None, None,
                        f"no usable rows ({report.rows_read} read; dropped: {dict(report.dropped)}){hint}")
    return Table(records, ranks, preprocess, report, str(root_p), tuple(upper_ranks),
                 {k: v for k, v in upper.items() if any(v)})
