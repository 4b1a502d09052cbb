"""What every metadata reader needs: reading files with errors that name file/row/field, cleaning
names, splitting binomials, choosing the modelled ranks, counting rejected rows.

Kept apart from table.py (the validated result and its checks) so each reader module is only its
format's own rules. Nothing here imports torch.
"""
from __future__ import annotations

import csv
import json
import os
import unicodedata
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..taxonomy import ALL_RANKS
from .table import DataError, ReadReport

# Spellings of "no name" seen in the formats: empty cells (FishNet's iNat-sourced rows, pandas NaN
# written as ""), BIOSCAN-1M's literal "not_classified", and pandas/R renderings of missing values.
MISSING_VALUES = frozenset({"", "not_classified", "nan", "none", "null", "na", "n/a"})


def clean(value: str | None) -> str | None:
    """A stripped name, or None when the cell means "missing". Cells of JSON files go through
    `json_text` first: str() of a list would turn ["Empidonax"] into the name "['Empidonax']"."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"a name must be a string, got {type(value).__name__} {value!r:.60}")
    s = value.strip()
    return None if s.lower() in MISSING_VALUES else s


def json_text(value: Any, *, source: str | os.PathLike, row: int | None, field: str,
              integers: bool = False) -> str | None:
    """A JSON value that must be text: a string, null (missing) or NaN (pandas' missing value, which
    Python's json module reads), and with `integers` an int (a BIOSCAN chunk). Anything else is a
    DataError naming the record and the field: never a name made up from a list or a number."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, str):
        return clean(value)
    if integers and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataError(source, row, field, f"expected a string{' or an integer' if integers else ''}, "
                    f"got {type(value).__name__} {json.dumps(value)[:60]}; fix the record")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:  # missing, a directory, no permission
        raise DataError(path, None, None, f"cannot read the metadata file: {e.strerror or e}") from e


def _decode_error(path: Path, delimiter: str | None = None) -> DataError:
    """The first undecodable byte of `path`, as a DataError naming its line and (tables) column.

    Found by decoding line by line: a newline byte never occurs inside a UTF-8 sequence."""
    header: list[str] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                field = None
                if delimiter and header:
                    col = raw[:e.start].count(delimiter.encode())
                    field = header[col] if col < len(header) else f"column {col + 1}"
                return DataError(path, n, field, f"not valid UTF-8 (byte 0x{raw[e.start]:02x}); "
                                 f"re-save the file as UTF-8")
            if n == 1 and delimiter:
                header = [h.strip() for h in text.lstrip("\ufeff").rstrip("\r\n").split(delimiter)]
    return DataError(path, None, None, "not valid UTF-8")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _decode_error(path) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, None, f"not valid JSON: {e.msg} (column {e.colno})") from e


def read_delimited(path: str | os.PathLike, report: ReadReport | None = None, strict: bool = False
                   ) -> tuple[list[str], Iterator[tuple[int, dict[str, str]]]]:
    """Header and (line number, row dict) pairs of a CSV or TSV file, streamed (BIOSCAN-1M's
    metadata is over a gigabyte).

    The delimiter is a tab when the header line holds one (BIOSCAN-1M's official TSV), else a comma.
    Line numbers are physical lines (header = line 1), so a user can open the file at that line.
    A ragged row (more or fewer cells than the header; empty cells past the end are harmless) would
    shift or blank its columns, so it is never read: a DataError under `strict` or without a
    `report` (lookup tables), else a counted skip. Two header cells naming one column (`genus`
    twice, or `genus` and `Genus`) are reported (error under `strict`); the first one is used.
    """
    path = Path(path)
    try:
        with open(path, "rb") as b:
            first = b.readline()
        f = open(path, encoding="utf-8-sig", newline="")
    except OSError as e:  # missing, a directory, no permission
        raise DataError(path, None, None, f"cannot read the metadata file: {e.strerror or e}") from e
    if not first.strip():
        f.close()
        raise DataError(path, None, None, "the file is empty (no header line)")
    # the decoder reads ahead in blocks, so any decode error below may concern a later line
    delimiter = "\t" if b"\t" in first else ","
    reader = csv.reader(f, delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
    except UnicodeDecodeError:
        f.close()
        raise _decode_error(path, delimiter) from None
    except csv.Error as e:
        f.close()
        raise DataError(path, 1, None, f"cannot parse the header: {e}") from e
    try:
        keep = _duplicate_columns(path, header, report, strict)
    except DataError:
        f.close()
        raise
    n = len(header)

    def rows() -> Iterator[tuple[int, dict[str, str]]]:
        with f:
            while True:
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except UnicodeDecodeError:
                    raise _decode_error(path, delimiter) from None
                except csv.Error as e:
                    raise DataError(path, reader.line_num, None, f"cannot parse the row: {e}") from e
                if not cells or not any(c.strip() for c in cells):
                    continue  # blank line
                if len(cells) != n:
                    if len(cells) > n and not any(c.strip() for c in cells[n:]):
                        cells = cells[:n]  # "a,b,c,," from a spreadsheet: nothing is shifted
                    else:
                        problem = (f"{len(cells)} cells but the header has {n} columns (an "
                                   f"unquoted delimiter in a cell, or cells left out); quote or fix it")
                        if report is None:
                            raise DataError(path, reader.line_num, None, problem)
                        reject(report, strict=strict, source=path, row=reader.line_num, field=None,
                               problem=problem, reason="ragged row")
                        continue
                if keep is None:
                    yield reader.line_num, dict(zip(header, cells))
                else:  # an exact duplicate name: dict(zip()) would keep the LAST column
                    yield reader.line_num, {header[i]: cells[i] for i in keep}

    return header, rows()


def _duplicate_columns(path: Path, header: Sequence[str], report: ReadReport | None,
                       strict: bool) -> list[int] | None:
    """Report header cells that name one column (case-insensitive; unnamed cells are ignored).
    Returns the column indices to read when a name repeats exactly (the first of each), else None."""
    by_key: dict[str, list[int]] = {}
    for i, h in enumerate(header):
        if h:
            by_key.setdefault(unicodedata.normalize("NFKC", h).casefold(), []).append(i)
    for idx in (v for v in by_key.values() if len(v) > 1):
        cols = " and ".join(f"{i + 1} {header[i]!r}" for i in idx)
        problem = (f"columns {cols} name the same field; the first (column {idx[0] + 1}) is used: "
                   f"rename or remove the other")
        if strict or report is None:
            raise DataError(path, 1, header[idx[1]], problem)
        report.warnings.append(f"{path}, row 1, field {header[idx[1]]!r}: {problem}")
    if len(set(header)) == len(header):
        return None
    first: dict[str, int] = {}
    for i, h in enumerate(header):
        first.setdefault(h, i)
    return sorted(first.values())


def find_columns(header: Sequence[str], wanted: Sequence[str]) -> dict[str, str]:
    """Map each wanted name (case-insensitive) to the header's spelling; absent names are left out."""
    by_lower: dict[str, str] = {}
    for h in header:
        by_lower.setdefault(h.strip().lower(), h)
    return {w: by_lower[w.lower()] for w in wanted if w.lower() in by_lower}


def require_columns(source: str | os.PathLike, header: Sequence[str], wanted: Sequence[str],
                    what: str = "") -> dict[str, str]:
    cols = find_columns(header, wanted)
    missing = [w for w in wanted if w not in cols]
    if missing:
        raise DataError(source, 1, missing[0],
                        f"missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
                        f"{' ' + what if what else ''}; the header has: {', '.join(h for h in header if h)}")
    return cols


def split_species(value: str | None, genus: str | None) -> tuple[str | None, str | None, str | None]:
    """(epithet, genus, problem) from a species cell that holds a binomial or an epithet.

    Identity is the lineage path, so the lineage stores the EPITHET and the binomial is genus + epithet
    (taxonomy.py). "Hydroporus striola" -> ("striola", genus, None). More than two words (a subspecies,
    "Genus sp. BOLD:..." placeholders) keep everything after the genus as the epithet, so the binomial
    reads back exactly as written. A first word that is not the genus is returned as `problem`: the
    row's labels contradict each other and no choice between them is safe. A missing genus is taken
    from the binomial (the caller counts that).
    """
    if value is None:
        return None, genus, None
    words = value.split()
    if len(words) == 1:
        return words[0], genus, None
    first, rest = words[0], " ".join(words[1:])
    if genus is None:
        return rest, first, None
    if first != genus:
        return None, genus, f"binomial {value!r} does not start with the genus {genus!r}"
    return rest, genus, None


def select_ranks(fmt: str, available: Sequence[str], requested: Sequence[str] | None,
                 fixed_upper: Sequence[str] = ()) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(modelled ranks, upper ranks) for `requested` (None: everything the format has).

    Upper ranks are the fixed ones above the format (FishNet: kingdom, phylum) plus the format's own
    ranks above the first modelled one: they travel with the taxonomy for the BioCLIP text only.
    Species needs genus: an epithet alone is ambiguous (DESIGN.md), and the binomial is genus + epithet.
    """
    available = tuple(available)
    if requested is None:
        ranks = available
    else:
        req = [r.strip().lower() for r in requested if r.strip()]
        unknown = [r for r in req if r not in available]
        if unknown or not req:
            raise ValueError(f"{fmt}: cannot model rank(s) {', '.join(unknown) or '(none given)'}; "
                             f"this format has {', '.join(available)}")
        if len(set(req)) != len(req):
            raise ValueError(f"{fmt}: a rank is repeated in {req}")
        ranks = tuple(sorted(req, key=ALL_RANKS.index))
    if "species" in ranks and "genus" not in ranks:
        raise ValueError(f"{fmt}: modelling species needs genus too (the species identity is "
                         f"genus + epithet); ranks given: {', '.join(ranks)}")
    first = available.index(ranks[0])
    return ranks, tuple(fixed_upper) + available[:first]


def reject(report: ReadReport, *, strict: bool, source: str | os.PathLike, row: int | None,
           field: str | None, problem: str, reason: str) -> None:
    """A row the reader cannot use: DataError under --strict, else dropped with a counted reason and a
    warning that names file, row and field (nothing is dropped silently)."""
    if strict:
        raise DataError(source, row, field, problem)
    report.rows_read += 1
    report.dropped[reason] += 1
    where = f"{source}" + (f", row {row}" if row is not None else "") + (f", field {field!r}" if field else "")
    report.warnings.append(f"{where}: {problem}; row dropped")
