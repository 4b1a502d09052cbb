"""The validated table every reader returns, the missing-rank policy, and the checks all formats share.

Readers (one module per metadata format) turn a file into `RawRow`s: the names they found per rank,
the image path, an optional box, and where the row came from. `build_table` applies the one policy for
missing ranks, checks what every format must satisfy (unique image ids, paths inside the image root,
one parent per name) and returns a `Table` whose `report` counts everything that was not used as is.
Nothing is dropped without a reason in `report.dropped`.
"""
from __future__ import annotations

import csv
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ..taxonomy import ALL_RANKS, NONE_NAME, Taxonomy

# drop: a row missing any modelled rank is dropped (counted per rank).
# keep: the row is kept for the levels above its first missing rank (it trains those stages only).
# fill: a missing rank becomes the name "None", as the released code does ("<rank>: None").
MISSING_POLICIES = ("drop", "keep", "fill")


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


def _inside(root: Path, rel: str) -> Path | None:
    """The resolved path of `rel` under `root`, or None if it escapes the root (.., symlinks, /abs)."""
    p = (root / rel).resolve()
    try:
        p.relative_to(root)
    except ValueError:
        return None
    return p


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
) -> Table:
    """Apply the missing-rank policy and the shared checks; see the module docstring.

    `ranks` are the modelled ranks; `upper_ranks` are ranks above them whose names travel with the
    taxonomy for the BioCLIP text only. Errors (`DataError`) name the file, row and field.
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

    for raw in rows:
        report.rows_read += 1
        if raw.image_id in seen_ids:
            first = seen_ids[raw.image_id]
            raise DataError(raw.source, raw.row, "image id",
                            f"duplicate image id {raw.image_id!r} (first at row {first.row})")
        seen_ids[raw.image_id] = raw
        path = _inside(root_p, raw.image)
        if path is None:
            raise DataError(raw.source, raw.row, "image",
                            f"path {raw.image!r} escapes the image root {root_p}")

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
        records.append(Record(raw.image_id, str(path), tuple(lineage), raw.source, raw.row, raw.box))

    if not records:
        raise DataError(sources[0] if sources else fmt, None, None,
                        f"no usable rows ({report.rows_read} read; dropped: {dict(report.dropped)})")
    return Table(records, ranks, preprocess, report, str(root_p), tuple(upper_ranks),
                 {k: v for k, v in upper.items() if any(v)})
