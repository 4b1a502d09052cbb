"""Taxonomy: ordered ranks, lineages, per-rank vocabularies, prompts (paper Sec. 3.2; DESIGN.md).

A taxon's identity is its lineage path (level 0 name ... its own name), never its name alone: the
epithet "auriga" under two genera, or a genus name reused in two families, are different taxa.
Vocabulary ids are the position of the path in the sorted vocabulary of its level, so the same set of
lineages always gives the same ids, whatever the order of the rows.
"""
from __future__ import annotations

import difflib
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

# Canonical ranks, top to bottom. A dataset models a subsequence of these (FishNet and BIOSCAN
# start at class, paper Sec. 4.1).
ALL_RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
# The released code fills a missing rank with the literal name "None" (REFERENCE-FACTS.md).
NONE_NAME = "None"
# Joins the names of a lineage in lookups ("Aves > Corvidae") and messages, so no name may hold it.
LINEAGE_SEPARATOR = " > "
# Few-shot species: at most this many training images (paper Sec. 4.4 uses 1-5).
FEW_SHOT_MAX = 5


@dataclass(frozen=True, order=True)
class Taxon:
    """One node of the tree. Equality and hashing use (level, path): the lineage is the identity."""

    level: int
    path: tuple[str, ...]
    rank: str = ""

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def binomial(self) -> str:
        """'Genus epithet' for a species whose parent is a genus; otherwise the plain name."""
        if self.rank == "species" and len(self.path) >= 2:
            return f"{self.path[-2]} {self.path[-1]}"
        return self.name

    def __str__(self) -> str:
        return f"{self.rank}: {self.binomial}"


def _check_names(lineage: tuple) -> None:
    """Names `find`/`lookup` can reach: text, stripped, without the lineage separator. A name
    holding " > " would be trained but could never be looked up by its lineage for sampling."""
    for n in lineage:
        if not isinstance(n, str) or not n or n != n.strip():
            raise ValueError(f"lineage {lineage}: every name must be non-empty text without "
                             f"surrounding spaces, got {n!r}")
        if LINEAGE_SEPARATOR in n:
            raise ValueError(f"lineage {lineage}: the name {n!r} holds the lineage separator "
                             f"{LINEAGE_SEPARATOR!r}; rename it")


class Taxonomy:
    """Ranks, per-level vocabularies, parents and children, image counts, prompts; JSON round trip.

    `lineages` are tuples of names aligned with `ranks`; a lineage may be shorter than `ranks` (a row
    kept only for the levels it has, see datasets/table.py). Each lineage counts as one image.
    `upper` maps a level-0 name to the names of the ranks above the modelled ones (e.g. FishNet:
    ("Animalia", "Chordata")), used only for the BioCLIP text, which wants the full lineage.
    """

    def __init__(
        self,
        ranks: Sequence[str],
        lineages: Iterable[Sequence[str]] = (),
        upper: Mapping[str, Sequence[str]] | None = None,
        upper_ranks: Sequence[str] = (),
        species_prompt: str = "binomial",
        counts: Mapping[tuple[str, ...], int] | None = None,
    ):
        ranks = tuple(ranks)
        bad = [r for r in ranks if r not in ALL_RANKS]
        if bad or list(ranks) != sorted(ranks, key=ALL_RANKS.index) or len(set(ranks)) != len(ranks):
            raise ValueError(f"ranks must be distinct and ordered as {ALL_RANKS}; got {ranks}")
        if species_prompt not in ("binomial", "epithet"):
            raise ValueError(f"species_prompt must be 'binomial' or 'epithet', got {species_prompt!r}")
        self.ranks = ranks
        self.upper_ranks = tuple(upper_ranks)
        self.upper = {k: tuple(v) for k, v in (upper or {}).items()}
        # "binomial": "species: Chaetodon auriga" (our default: identity is the binomial).
        # "epithet": the released code's "specific_epithet: auriga", which collides across genera.
        self.species_prompt = species_prompt
        self._counts: dict[tuple[str, ...], int] = defaultdict(int)
        for lin in lineages:
            lin = tuple(lin)
            if not 1 <= len(lin) <= len(ranks) or any(not n for n in lin):
                raise ValueError(f"lineage {lin} does not fit ranks {ranks}")
            _check_names(lin)
            for i in range(len(lin)):
                self._counts[lin[: i + 1]] += 1
        for path, n in (counts or {}).items():  # from JSON: counts are stored per path
            path = tuple(path)
            if not 1 <= len(path) <= len(ranks):
                raise ValueError(f"lineage {path} does not fit ranks {ranks}")
            _check_names(path)
            self._counts[path] = int(n)
        self._build()

    def _build(self) -> None:
        self._vocab: list[list[tuple[str, ...]]] = [[] for _ in self.ranks]
        for path in self._counts:
            self._vocab[len(path) - 1].append(path)
        for v in self._vocab:
            v.sort()
        self._index = [{p: i for i, p in enumerate(v)} for v in self._vocab]
        self._children: dict[tuple[str, ...], list[tuple[str, ...]]] = defaultdict(list)
        self._by_name: list[dict[str, list[tuple[str, ...]]]] = [defaultdict(list) for _ in self.ranks]
        for level, v in enumerate(self._vocab):
            for p in v:
                if level:
                    self._children[p[:-1]].append(p)
                self._by_name[level][p[-1]].append(p)
                if self.ranks[level] == "species" and level and self.ranks[level - 1] == "genus":
                    self._by_name[level].setdefault(f"{p[-2]} {p[-1]}", []).append(p)

    # -- structure -------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.ranks)

    def level_of(self, rank: str) -> int:
        if rank not in self.ranks:
            raise KeyError(f"rank {rank!r} is not modelled here; ranks are {self.ranks}")
        return self.ranks.index(rank)

    def taxon(self, level: int, index: int) -> Taxon:
        return Taxon(level, self._vocab[level][index], self.ranks[level])

    def vocab(self, level: int) -> list[Taxon]:
        return [Taxon(level, p, self.ranks[level]) for p in self._vocab[level]]

    def size(self, level: int) -> int:
        return len(self._vocab[level])

    def id(self, taxon: Taxon) -> int:
        return self._index[taxon.level][taxon.path]

    def make(self, path: Sequence[str]) -> Taxon:
        """The taxon at `path` (names from level 0); KeyError if it is not in this taxonomy."""
        path = tuple(path)
        if not path or len(path) > len(self.ranks) or path not in self._index[len(path) - 1]:
            raise KeyError(f"no taxon with lineage {' > '.join(path)}")
        return Taxon(len(path) - 1, path, self.ranks[len(path) - 1])

    def parent(self, taxon: Taxon) -> Taxon | None:
        return self.make(taxon.path[:-1]) if taxon.level else None

    def children(self, taxon: Taxon) -> list[Taxon]:
        lvl = taxon.level + 1
        return [Taxon(lvl, p, self.ranks[lvl]) for p in self._children.get(taxon.path, [])]

    def ancestors(self, taxon: Taxon) -> list[Taxon]:
        """Level 0 ... the taxon itself."""
        return [self.make(taxon.path[: i + 1]) for i in range(taxon.level + 1)]

    def ids(self, taxon: Taxon) -> list[int]:
        """Vocabulary id of each ancestor, level 0 ... taxon.level."""
        return [self._index[i][taxon.path[: i + 1]] for i in range(taxon.level + 1)]

    def count(self, taxon: Taxon) -> int:
        """Number of images whose lineage passes through this taxon."""
        return self._counts.get(taxon.path, 0)

    @property
    def species(self) -> list[Taxon]:
        return self.vocab(len(self.ranks) - 1)

    def few_shot_species(self, max_images: int = FEW_SHOT_MAX) -> list[Taxon]:
        return [t for t in self.species if 0 < self.count(t) <= max_images]

    # -- lookup ------------------------------------------------------------------------------
    def find(self, name: str, rank: str | None = None) -> list[Taxon]:
        """Every taxon called `name` (a binomial for species), optionally at one rank."""
        if LINEAGE_SEPARATOR in name:  # a full lineage path
            try:
                return [self.make([n.strip() for n in name.split(LINEAGE_SEPARATOR)])]
            except KeyError:
                return []
        levels = [self.level_of(rank)] if rank else range(len(self.ranks) - 1, -1, -1)
        return [Taxon(l, p, self.ranks[l]) for l in levels for p in self._by_name[l].get(name, [])]

    def lookup(self, name: str, rank: str | None = None) -> Taxon:
        """The one taxon called `name`; KeyError naming close matches, or every candidate if ambiguous.

        Species are looked up by binomial ("Chaetodon auriga"); any taxon by its full lineage joined
        with " > " ("Aves > Passeriformes > Corvidae"); other ranks by name, optionally with `rank`.
        """
        hits = self.find(name, rank)
        if rank is None and len(hits) > 1:
            # a binomial beats an epithet that happens to equal it
            exact = [t for t in hits if t.binomial == name]
            hits = exact if len(exact) == 1 else hits
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            alts = "; ".join(" > ".join(t.path) + f" ({t.rank})" for t in hits[:10])
            raise KeyError(f"{name!r} is ambiguous: {len(hits)} taxa match ({alts}). "
                           f"Give the rank or the full lineage joined with ' > '.")
        pool = {n for l in ([self.level_of(rank)] if rank else range(len(self.ranks)))
                for n in self._by_name[l]}
        close = difflib.get_close_matches(name, sorted(pool), n=5, cutoff=0.6)
        where = f"at rank {rank!r}" if rank else "at any rank"
        hint = f"; closest names: {', '.join(close)}" if close else ""
        raise KeyError(f"unknown taxon {name!r} {where}{hint}")

    # -- text ----------------------------------------------------------------------------------
    def prompt(self, taxon: Taxon) -> str:
        """The per-level prompt "<rank>: <name>" (paper Sec. 3.2, rank in lower case)."""
        if taxon.rank == "species" and taxon.name != NONE_NAME:
            if self.species_prompt == "epithet":
                return f"specific_epithet: {taxon.name}"
            return f"species: {taxon.binomial}"
        return f"{taxon.rank}: {taxon.name}"

    def prompts(self, taxon: Taxon) -> list[str]:
        """One prompt per level, level 0 ... taxon.level."""
        return [self.prompt(t) for t in self.ancestors(taxon)]

    def lineage_text(self, taxon: Taxon) -> str:
        """The whole lineage as plain text: the `lora-text` baseline's prompt (paper Sec. 4.2)."""
        return ", ".join(self.prompts(taxon))

    def bioclip_text(self, taxon: Taxon) -> str:
        """BioCLIP's taxonomic text: "a photo of Animalia Chordata ... Chaetodon auriga."

        Upper ranks not modelled here come from `upper`; the epithet is lower case as in BioCLIP's
        training text (REFERENCE-FACTS.md). Missing ("None") names are left out.
        """
        names = list(self.upper.get(taxon.path[0], ()))
        for t in self.ancestors(taxon):
            if t.name == NONE_NAME:
                continue
            names.append(t.name.lower() if t.rank == "species" else t.name)
        return "a photo of " + " ".join(names) + "."

    # -- persistence ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "ranks": list(self.ranks),
            "upper_ranks": list(self.upper_ranks),
            "upper": {k: list(v) for k, v in sorted(self.upper.items())},
            "species_prompt": self.species_prompt,
            # every path with its image count; ids are derived by sorting, so they round-trip
            "counts": [[list(p), n] for p, n in sorted(self._counts.items())],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "Taxonomy":
        return cls(d["ranks"], upper=d.get("upper"), upper_ranks=d.get("upper_ranks", ()),
                   species_prompt=d.get("species_prompt", "binomial"),
                   counts={tuple(p): n for p, n in d["counts"]})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> "Taxonomy":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Taxonomy) and self.to_dict() == other.to_dict()

    def summary(self) -> dict[str, int]:
        """Number of taxa per rank."""
        return {r: len(v) for r, v in zip(self.ranks, self._vocab)}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{r} {n}" for r, n in self.summary().items())
        return f"Taxonomy({sizes})"
