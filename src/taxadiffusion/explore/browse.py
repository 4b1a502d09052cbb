"""The taxonomy side of the explorer: tree nodes, search with close names, lineages, training images.

Nothing here touches the model, so these requests are answered at once from the request threads,
even while the worker is sampling (engine.py).
"""
from __future__ import annotations

import difflib
import io
import threading
from collections import Counter, OrderedDict, defaultdict
from pathlib import Path
from typing import Sequence

from ..taxonomy import FEW_SHOT_MAX, LINEAGE_SEPARATOR, Taxon, Taxonomy

MAX_MATCHES = 30        # search results listed (a substring like "a" matches most of a big taxonomy)
MAX_QUERY = 300         # characters of a search or taxon text
TRAINING_SHOWN = 12     # training images shown beside the samples
TRAINING_CACHE = 64     # training grids kept as PNG bytes


class BadInput(ValueError):
    """A request the page must answer with its message (HTTP 400), never a traceback."""


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def split_lineage(text: str) -> list[str]:
    names = [n.strip() for n in text.split(LINEAGE_SEPARATOR.strip())]
    if any(not n for n in names):
        raise BadInput(f"{text!r} has an empty name; write a lineage as 'Genus > epithet' or "
                       f"'A > B > ... > name'")
    return names


class TaxonomyView:
    """Tree, search and lineage resolution over a pipeline's taxonomy (read-only: thread safe)."""

    def __init__(self, pipe, run: Path):
        self.pipe = pipe
        self.tax: Taxonomy = pipe.taxonomy
        self.run = run
        # few-shot species below each node, so the tree can mark a whole branch before it is opened
        self.few_below: Counter = Counter()
        for s in self.tax.few_shot_species():
            for i in range(1, len(s.path) + 1):
                self.few_below[s.path[:i]] += 1
        # lower-case name or binomial -> taxa: case-insensitive search and close-name suggestions
        self.names: dict[str, list[Taxon]] = defaultdict(list)
        for lvl in range(self.tax.num_levels):
            for t in self.tax.vocab(lvl):
                self.names[t.name.lower()].append(t)
                if t.binomial != t.name:
                    self.names[t.binomial.lower()].append(t)
        self._training = None
        self._training_lock = threading.Lock()
        self._grids: OrderedDict = OrderedDict()

    # -- nodes --------------------------------------------------------------------------------------
    def node(self, t: Taxon) -> dict:
        last = t.level == self.tax.num_levels - 1
        return {"name": t.name, "label": t.binomial, "path": list(t.path),
                "lineage": LINEAGE_SEPARATOR.join(t.path), "rank": t.rank, "level": t.level,
                "count": self.tax.count(t), "children": len(self.tax.children(t)),
                "few_shot": last and 0 < self.tax.count(t) <= FEW_SHOT_MAX,
                "few_shot_below": self.few_below.get(t.path, 0), "unseen": False}

    def children(self, lineage: str) -> dict:
        if not lineage.strip():
            kids = self.tax.vocab(0)
            return {"path": [], "rank": self.tax.ranks[0], "children": [self.node(t) for t in kids]}
        try:
            t = self.tax.make(split_lineage(lineage))
        except KeyError as e:
            raise BadInput(e.args[0]) from None
        return {"path": list(t.path), "rank": self.tax.ranks[min(t.level + 1, self.tax.num_levels - 1)],
                "children": [self.node(c) for c in self.tax.children(t)]}

    def resolve(self, text) -> tuple[str, ...]:
        """The whole lineage of a name, binomial or lineage path (which may end in unseen names).

        A path may start below the top rank when its first name is unique ("Corvus > nova" is
        "Aves > Corvidae > Corvus > nova"): the pipeline wants lineages from level 0, and this is
        how a user names an unseen species under a known genus."""
        if not isinstance(text, str) or not text.strip():
            raise BadInput("name a taxon: a name, a binomial, or a lineage 'Genus > epithet'")
        text = text.strip()
        if len(text) > MAX_QUERY:
            raise BadInput(f"a taxon is at most {MAX_QUERY} characters, got {len(text)}")
        if LINEAGE_SEPARATOR.strip() in text:
            names = split_lineage(text)
            if not self.tax.find(names[0], rank=self.tax.ranks[0]):
                hits = self.tax.find(names[0])
                if len(hits) == 1:
                    names = [*hits[0].path, *names[1:]]
                else:
                    self._raise_lookup(names[0])
            text = LINEAGE_SEPARATOR.join(names)
        try:
            return tuple(self.pipe.resolve_taxon(text))
        except KeyError as e:
            raise BadInput(e.args[0] if e.args else str(e)) from None

    def _raise_lookup(self, name: str) -> None:
        try:
            self.tax.lookup(name)
        except KeyError as e:
            raise BadInput(e.args[0]) from None

    def describe(self, names: Sequence[str]) -> dict:
        """A node for a resolved lineage, seen or not, with what the page needs to offer for it."""
        known = self.pipe.known_depth(names)
        if known == len(names):
            d = self.node(self.tax.make(names))
        else:
            lvl = len(names) - 1
            d = {"name": names[-1], "label": names[-1], "path": list(names),
                 "lineage": LINEAGE_SEPARATOR.join(names), "rank": self.tax.ranks[lvl], "level": lvl,
                 "count": 0, "children": 0, "few_shot": False, "few_shot_below": 0, "unseen": True}
            if self.tax.ranks[lvl] == "species" and lvl and self.tax.ranks[lvl - 1] == "genus":
                d["label"] = f"{names[-2]} {names[-1]}"
        d["known_depth"] = known
        d["ancestors"] = [{"rank": self.tax.ranks[i], "name": n, "lineage": LINEAGE_SEPARATOR.join(names[: i + 1])}
                          for i, n in enumerate(names)]
        d["child_rank"] = (self.tax.ranks[len(names)] if len(names) < self.tax.num_levels else None)
        return d

    # -- search -------------------------------------------------------------------------------------
    def search(self, query) -> dict:
        if not isinstance(query, str) or not query.strip():
            raise BadInput("type a name, a binomial (Genus epithet) or a lineage (A > B > C)")
        q = query.strip()
        if len(q) > MAX_QUERY:
            raise BadInput(f"a search is at most {MAX_QUERY} characters, got {len(q)}")
        if LINEAGE_SEPARATOR.strip() in q:
            try:
                return {"query": q, "matches": [self.describe(self.resolve(q))], "suggestions": []}
            except BadInput as e:
                first = split_lineage(q)[0]
                return {"query": q, "matches": [], "message": str(e),
                        "suggestions": self._close(first)}
        key = q.lower()
        exact = self.names.get(key, [])
        partial = sorted({t for k, ts in self.names.items() if key in k and k != key for t in ts},
                         key=lambda t: (t.level, t.path))
        seen, matches = set(), []
        for t in [*exact, *partial]:
            if t not in seen:
                seen.add(t)
                matches.append(self.node(t))
        out = {"query": q, "matches": matches[:MAX_MATCHES], "total": len(matches), "suggestions": []}
        if not matches:
            close = self._close(q)
            out["suggestions"] = close
            out["message"] = (f"unknown taxon {q!r}" +
                              (f"; closest names: {', '.join(s['label'] for s in close)}" if close else ""))
        return out

    def _close(self, text: str) -> list[dict]:
        """Close names (difflib, as Taxonomy.lookup) as clickable nodes."""
        keys = difflib.get_close_matches(text.lower(), list(self.names), n=5, cutoff=0.6)
        return [self.node(t) for k in keys for t in self.names[k]][:10]

    # -- training images ----------------------------------------------------------------------------
    def _training_index(self) -> dict:
        """{lineage prefix: (count, first records)} from the run's config's data section, read once."""
        with self._training_lock:
            if self._training is None:
                self._training = self._read_training()
            return self._training

    def _read_training(self) -> dict:
        import json

        from ..checkpoint import resolve_checkpoint
        from ..config import from_dict
        from ..datasets import read_table
        try:
            cfg = from_dict(json.loads((resolve_checkpoint(self.run) / "config.json").read_text()))
        except Exception as e:  # a saved pipeline carries no data location: say so, keep serving
            return {"error": f"no training images: {self.run} has no run config with a data section ({e})"}
        d = cfg.data
        try:
            table = read_table(d.format, d.metadata, d.root, ranks=list(self.tax.ranks),
                               missing=d.missing_ranks, check_files=False)
        except Exception as e:  # moved or unreadable data: the rest of the explorer still works
            return {"error": f"no training images: reading {d.format} data at {d.root} failed: {e}"}
        first: dict[tuple, list] = defaultdict(list)
        count: Counter = Counter()
        for r in table.records:
            for i in range(1, len(r.lineage) + 1):
                count[r.lineage[:i]] += 1
                if len(first[r.lineage[:i]]) < TRAINING_SHOWN:
                    first[r.lineage[:i]].append(r)
        return {"first": first, "count": count, "resolution": d.resolution,
                "preprocess": d.preprocess or table.preprocess}

    def training(self, text) -> tuple[dict, bytes | None]:
        """(what the page says, a grid PNG of up to TRAINING_SHOWN preprocessed training images or None).

        An unseen taxon shows its nearest known ancestor's images, and says so."""
        names = self.resolve(text)
        index = self._training_index()
        if "error" in index:
            return {"count": 0, "message": index["error"]}, None
        known = tuple(names[: self.pipe.known_depth(names)])
        info = {"count": index["count"].get(known, 0), "lineage": LINEAGE_SEPARATOR.join(known)}
        if known != names:
            info["message"] = (f"{names[-1]!r} is unseen; showing the training images of its known "
                               f"ancestor {known[-1]}")
        if not info["count"]:
            info.setdefault("message", "no training images of this taxon in the run's data")
            return info, None
        png, shown, bad = self._grid(known, index)
        info.update(shown=shown, unreadable=bad)
        return info, png

    def _grid(self, path: tuple, index: dict) -> tuple[bytes | None, int, int]:
        with self._training_lock:
            if path in self._grids:
                self._grids.move_to_end(path)
                return self._grids[path]
        import torch

        from ..datasets.images import PREPROCESS, load_image, to_tensor
        from ..imaging import labelled_grid, uint8_from_unit
        fn, res = PREPROCESS[index["preprocess"]], index["resolution"]
        imgs, bad = [], 0
        for r in index["first"].get(path, []):
            try:  # the model's view of the image: the preprocessing it was trained with
                imgs.append(uint8_from_unit(to_tensor(fn(load_image(r.path), r.box, res, None))))
            except Exception:  # a missing or broken file is counted, not fatal
                bad += 1
        png = None
        if imgs:
            t = torch.stack(imgs)
            rows = [t[i:i + 6] for i in range(0, len(t), 6)]
            png = png_bytes(labelled_grid(rows, [], [], cell=max(96, min(res, 256))))
        with self._training_lock:
            self._grids[path] = (png, len(imgs), bad)
            while len(self._grids) > TRAINING_CACHE:
                self._grids.popitem(last=False)
        return png, len(imgs), bad
