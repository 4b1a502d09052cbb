"""A synthetic species world with known ground truth: species whose visual traits are inherited down a taxonomy.

No GPU and no pretrained weights, yet we must show that species fidelity improves with progressive
training and TaxaGuide and that rare species profit from their relatives (paper Sec. 4.3, 4.4). Here every
rank adds traits that all its descendants inherit, coarse high up and subtle low down:

    class   body plan      ellipse | diamond | box | egg
    order   proportions    aspect ratio (1.3 | 1.6 | 1.9) and tail (fan | fork | round)
    family  base colour    hue, spread along the golden-ratio sequence (siblings far apart)
    genus   pattern        bands | spots | stripe | saddle | ring | cap | chevron, dark or light; or plain
    species one small mark position (front/rear x top/bottom) and colour (black | white | contrast hue)

Siblings always differ in their own rank's trait, so congeneric species differ only in one mark of a few
pixels, as real congeners differ in details. Inside a species images vary strongly: rotation, scale,
position, mirror, background colour and gradient, colour jitter. `perturb=True` adds what generated
samples do and renders never do (DESIGN.md, the oracle): saturated backgrounds, pixel noise, blur and
stronger colour jitter.

Long tail: species are ranked in a seeded random order and species r of S gets
round(max_images * (min_images / max_images) ** (r / (S - 1))) images, log-linear from `max_images` to
`min_images`. The default world (2 classes, 4 orders, 8 families, 16 genera, 89 species) has 1942 images:
8 species with 1 image, 25 with 2-5, 25 with 6-20, 31 with 21-100 (median 10); rare and common species
share genera, so a rare species has well-documented relatives.

Difficulty dial (WorldConfig): species become harder to tell apart with a smaller `mark_size` (the mark's
radius as a fraction of the image side), a lower `mark_contrast`, stronger variation (`rotation`, `scale`,
`shift`, `colour_jitter`), a smaller `image_size`, and more species per genus (the last `branching` entry:
more marks to tell apart, at most 12). Default and why: at 32 px a body is about 20 x 12 px and a genus
pattern covers a third to a half of it (~100 px), family colour and class/order shape cover all of it, while
a species is one disc of radius 0.055 x 32 = 1.8 px (~10 px, 3-4 px across) whose place on the body (front
or rear, top or bottom, under 20 degrees of rotation and a mirror) and colour must both be right. The oracle
sees such marks (>= 98% species accuracy, benchmarks/oracle_table.py). Halve `mark_size` or raise species
per genus for a harder world; double it for an easier one.

Calibration, measured (README "What a 5-minute CPU training run can and cannot show"; oracle accuracy,
CFG 3, chance 0.50 / 0.25 / 0.13 / 0.06 / 0.01): the target was a tiny model that, after about 10
minutes on our 2-core CPU, gets the high ranks right and the species partly. Training every UNet
weight and all levels (`all`, from the shipped base) with plain MSE gives class 0.63, order 0.38,
family 0.20, genus 0.16, species 0.05 after 720 steps of 32 images (12 minutes at 1.0 s a step), 0.70 /
0.55 / 0.30 / 0.27 / 0.06 after 1440 and 0.80 / 0.71 / 0.51 / 0.40 / 0.08 after 2160 (36 minutes); with
rotation 5, scale 0.95-1.05, shift 0.03 and colour_jitter 0.5 it is 0.70 / 0.44 / 0.20 / 0.12 / 0.03
after 720. Less variation does not help; min-SNR loss weighting (train.snr_gamma=2) does: 0.83 / 0.71 /
0.35 / 0.30 / 0.07 after 720 steps (another seed: 0.84 / 0.68 / 0.38 / 0.34 / 0.13), the target's shape
at about its time, so the default world stays. DESIGN.md's earlier "about 0.9
node accuracy to genus in 12 minutes" was a 48-species world and a model "conditioned on summed
per-level embeddings"; we have not reproduced it with the text-encoder pipeline.

Images: numpy uint8 (N, H, W, 3). Image i of `render(..., seed=s)` is drawn from its own generator seeded
(*s, i), so results do not depend on batch size, and a clean and a perturbed render of the same seed show the
same individual.
"""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..taxonomy import Taxon, Taxonomy

RANKS = ("class", "order", "family", "genus", "species")
# Part of every cache key (datasets, oracle): bump when a rendering or naming rule changes.
GENERATOR_VERSION = 1

BODIES = (("ellipse", 2.0, 0.0), ("diamond", 1.3, 0.0), ("box", 3.5, 0.0), ("egg", 2.0, 0.45))  # name, p, taper
ORDERS = tuple((a, t) for t in ("fan", "fork", "round") for a in (1.3, 1.6, 1.9))           # aspect, tail
PATTERNS = ("plain", "bands", "spots", "stripe", "saddle", "ring", "cap", "chevron")
GENERA = (("plain", "none"),) + tuple((p, t) for t in ("dark", "light") for p in PATTERNS[1:])
MARK_POSITIONS = {"front-top": (0.42, 0.42), "front-bottom": (0.42, -0.42),
                  "rear-top": (-0.42, 0.42), "rear-bottom": (-0.42, -0.42)}
MARK_COLOURS = ("black", "white", "contrast")
MARKS = tuple((p, c) for c in MARK_COLOURS for p in MARK_POSITIONS)
# options per rank; the family hue is unbounded (golden-ratio sequence)
N_OPTIONS = (len(BODIES), len(ORDERS), None, len(GENERA), len(MARKS))
GOLDEN = 0.6180339887
TAIL = 0.5          # tail length in body half-lengths
STREAMS = {"dataset": 0, "oracle-train": 1, "oracle-eval": 2}  # disjoint seed streams


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines the world; its `hash()` keys every cache built from it."""

    seed: int = 0
    # (min, max) children per parent: classes, orders per class, families per order, genera per
    # family, species per genus. Default: 16 genera of 3-7 species, about 80 species.
    branching: tuple[tuple[int, int], ...] = ((2, 2), (2, 2), (2, 2), (2, 2), (3, 7))
    image_size: int = 32            # 64 works too; marks and bodies scale with it
    max_images: int = 100           # long tail, see the module docstring
    min_images: int = 1
    # -- difficulty dial (module docstring) --
    mark_size: float = 0.055        # species mark radius / image side (x body scale): ~2 px at 32
    mark_contrast: float = 1.0      # 1: pure mark colour; lower blends the mark into the body
    rotation: float = 20.0          # +- degrees; small enough that "top" stays top (marks need it)
    scale: tuple[float, float] = (0.8, 1.15)
    shift: float = 0.08             # +- fraction of the image side
    mirror: bool = True             # horizontal flip: the tail still tells front from rear
    colour_jitter: float = 1.0      # scales hue (+-0.025), saturation and brightness jitter

    def __post_init__(self) -> None:
        # a value of the wrong type (e.g. `--world rotation=abc`) would otherwise fail only mid-render
        for f in fields(self):
            v, want = getattr(self, f.name), {"int": int, "float": (int, float), "bool": bool}.get(f.type)
            if want and (not isinstance(v, want) or (f.type != "bool" and isinstance(v, bool))):
                raise TypeError(f"WorldConfig.{f.name} must be {f.type}, got {v!r}")
        object.__setattr__(self, "branching", tuple(tuple(int(v) for v in b) for b in self.branching))
        object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))
        if len(self.branching) != len(RANKS):
            raise ValueError(f"branching needs one (min, max) per rank {RANKS}, got {self.branching}")
        for rank, (lo, hi), k in zip(RANKS, self.branching, N_OPTIONS):
            if not 1 <= lo <= hi or (k is not None and hi > k):
                raise ValueError(f"branching for {rank} must be 1 <= min <= max"
                                 f"{f' <= {k} (distinct traits available)' if k else ''}; got {(lo, hi)}")
        if self.image_size < 16 or not 1 <= self.min_images <= self.max_images:
            raise ValueError("image_size must be >= 16 and 1 <= min_images <= max_images")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WorldConfig":
        """From `to_dict()` output, or from a whole world.json (its "config", generator version checked)."""
        if "config" in d:
            if d.get("generator_version") != GENERATOR_VERSION:
                raise ValueError(f"world.json was written by synthetic generator version "
                                 f"{d.get('generator_version')}, this code renders version {GENERATOR_VERSION}: "
                                 f"its images differ from fresh renders; rewrite it with write_dataset")
            d = d["config"]
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise KeyError(f"unknown WorldConfig key(s) {', '.join(unknown)}")
        return cls(**{k: tuple(map(tuple, v)) if k == "branching" else v for k, v in d.items()})

    @classmethod
    def load(cls, path: str | Path) -> "WorldConfig":
        """The config of a dataset folder's world.json (or of the file itself)."""
        p = Path(path)
        p = p / "world.json" if p.is_dir() else p
        return cls.from_dict(json.loads(p.read_text()))

    def hash(self) -> str:
        blob = json.dumps({"generator": GENERATOR_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- names -------------------------------------------------------------------------------------------
_ONSETS = ("b", "c", "d", "f", "g", "l", "m", "n", "p", "r", "s", "t", "v", "ph", "th", "ch", "cr", "tr",
           "pl", "st", "gl", "br", "h", "x")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "y", "ae", "au")
_CODAS = ("r", "l", "n", "s", "c", "t", "m", "nd", "rv", "st", "rc")
_ENDINGS = {"class": ("ia", "ea", "opoda"), "order": ("iformes",), "family": ("idae",),
            "genus": ("a", "us", "is", "on", "ops", "ella", "ura", "ix", "ida", "odes"),
            "species": ("ens", "atus", "ina", "osus", "alis", "ensis", "icus", "ata", "ulus", "ior", "ax")}


def _name(rng: np.random.Generator, rank: str, used: set[str]) -> str:
    """A Latin-looking name ("Velorida", epithet "parvens"), new across every rank of the world."""
    while True:
        syl = 2 if rank != "species" else int(rng.integers(1, 3))
        stem = "".join(str(rng.choice(_ONSETS)) + str(rng.choice(_VOWELS)) for _ in range(syl))
        name = stem + str(rng.choice(_CODAS)) + str(rng.choice(_ENDINGS[rank]))
        name = name if rank == "species" else name.capitalize()
        if name.lower() not in used:
            used.add(name.lower())
            return name


# -- the world ----------------------------------------------------------------------------------------
SpeciesRef = Taxon | Sequence[str] | str | int


@dataclass
class World:
    """The taxonomy, the species' lineages (in taxonomy species-id order), their traits and image counts."""

    cfg: WorldConfig
    taxonomy: Taxonomy
    lineages: list[tuple[str, ...]]
    counts: dict[tuple[str, ...], int]     # images per species in the dataset (long tail)
    options: np.ndarray                    # (species, level): trait option index per rank
    hue0: float

    def species_id(self, ref: SpeciesRef) -> int:
        """A species by id, Taxon, lineage (tuple of names) or binomial ("Velorida parvens")."""
        if isinstance(ref, (int, np.integer)):
            if not 0 <= ref < len(self.lineages):
                raise KeyError(f"species id {ref} out of range 0..{len(self.lineages) - 1}")
            return int(ref)
        t = self.taxonomy.lookup(ref, "species") if isinstance(ref, str) else (
            ref if isinstance(ref, Taxon) else self.taxonomy.make(ref))
        if t.rank != "species":
            raise KeyError(f"{t} is not a species")
        return self.taxonomy.id(t)

    def traits(self, ref: SpeciesRef) -> dict[str, dict[str, object]]:
        """Ground-truth trait values per rank, for tests and analysis."""
        return trait_values(self.options[self.species_id(ref)], self.hue0)

    def render(self, ref: SpeciesRef | Sequence[SpeciesRef], n: int | None = None,
               seed: int | Sequence[int] = 0, perturb: bool = False) -> np.ndarray:
        """n images of one species, or one image per entry of a list of species; uint8 (N, H, W, 3)."""
        if isinstance(ref, (list, np.ndarray)):
            if n is not None and n != len(ref):
                raise ValueError(f"n={n} but {len(ref)} species given")
            ids = np.array([self.species_id(r) for r in ref], dtype=np.int64)
        else:
            ids = np.full(1 if n is None else n, self.species_id(ref), dtype=np.int64)
        return render_options(self.options[ids], self.cfg, self.hue0, seed, perturb)

    def render_swap(self, a: SpeciesRef, b: SpeciesRef, n: int, seed: int | Sequence[int] = 0,
                    rank: str = "species", perturb: bool = False) -> np.ndarray:
        """Images with the traits of `a` above `rank` and those of `b` from `rank` down.

        The default is the sibling swap: `b` must share `a`'s genus, and the images show a's genus with b's
        mark (label them `a` and a species classifier must fail, a genus classifier must not).
        """
        ia, ib, lvl = self.species_id(a), self.species_id(b), RANKS.index(rank)
        if self.lineages[ia][:lvl] != self.lineages[ib][:lvl]:
            raise ValueError(f"{' '.join(self.lineages[ib][-2:])} is not in the same {RANKS[lvl - 1]} as "
                             f"{' '.join(self.lineages[ia][-2:])}" if lvl else "rank 0 swaps everything")
        row = np.concatenate([self.options[ia, :lvl], self.options[ib, lvl:]])
        return render_options(np.repeat(row[None], n, 0), self.cfg, self.hue0, seed, perturb)

    def siblings(self, ref: SpeciesRef) -> list[int]:
        """Ids of the other species of the same genus."""
        i = self.species_id(ref)
        return [j for j, lin in enumerate(self.lineages) if lin[:-1] == self.lineages[i][:-1] and j != i]

    def dataset_lineages(self) -> list[tuple[str, ...]]:
        """One lineage per dataset image, species in id order."""
        return [lin for lin in self.lineages for _ in range(self.counts[lin])]


def long_tail(n_species: int, max_images: int, min_images: int) -> list[int]:
    """Images per species, by popularity rank: log-linear from max_images down to min_images."""
    if n_species == 1:
        return [max_images]
    r = np.arange(n_species) / (n_species - 1)
    return [int(np.floor(v + 0.5)) for v in max_images * (min_images / max_images) ** r]


def make_world(cfg: WorldConfig = WorldConfig()) -> World:
    """The deterministic world of `cfg`: same config, same names, traits and counts."""
    rng = np.random.default_rng([cfg.seed, 7])
    used: set[str] = set()
    nodes: list[tuple[str, ...]] = [()]
    option: dict[tuple[str, ...], int] = {}
    for level, (rank, (lo, hi), k) in enumerate(zip(RANKS, cfg.branching, N_OPTIONS)):
        nodes = [p + (_name(rng, rank, used),) for p in nodes for _ in range(int(rng.integers(lo, hi + 1)))]
        # siblings are consecutive here, so cycling a permutation gives them distinct options
        perm = rng.permutation(k) if k else None
        for j, p in enumerate(nodes):
            option[p] = int(perm[j % k]) if k else j
    hue0 = float(rng.random())
    lineages = sorted(nodes)
    order = rng.permutation(len(lineages))
    per_rank = long_tail(len(lineages), cfg.max_images, cfg.min_images)
    counts = {lineages[s]: per_rank[r] for r, s in enumerate(order)}
    options = np.array([[option[lin[:l + 1]] for l in range(len(RANKS))] for lin in lineages], np.int64)
    tax = Taxonomy(RANKS, [lin for lin in lineages for _ in range(counts[lin])])
    assert [t.path for t in tax.species] == lineages  # ids of the taxonomy = rows of `options`
    return World(cfg, tax, lineages, counts, options, hue0)


def _hue(option: int, hue0: float) -> float:
    return (hue0 + option * GOLDEN) % 1.0


def trait_values(row: np.ndarray, hue0: float) -> dict[str, dict[str, object]]:
    body, aspect_tail, fam, genus, mark = (int(v) for v in row)
    return {"class": {"body": BODIES[body][0]},
            "order": {"aspect": ORDERS[aspect_tail][0], "tail": ORDERS[aspect_tail][1]},
            "family": {"hue": round(_hue(fam, hue0), 4)},
            "genus": {"pattern": GENERA[genus][0], "tone": GENERA[genus][1]},
            "species": {"mark_position": MARKS[mark][0], "mark_colour": MARKS[mark][1]}}


# -- rendering -----------------------------------------------------------------------------------------
def _hsv(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, (...,) -> (..., 3), all in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0]) + h[..., None] * 6) % 6
    return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def render_options(rows: np.ndarray, cfg: WorldConfig, hue0: float, seed: int | Sequence[int] = 0,
                   perturb: bool = False, chunk: int = 512) -> np.ndarray:
    """Render one image per row of trait options (n, 5); image i uses a generator seeded (*seed, i)."""
    seed = [int(seed)] if np.isscalar(seed) else [int(s) for s in seed]
    out = np.empty((len(rows), cfg.image_size, cfg.image_size, 3), np.uint8)
    for s in range(0, len(rows), chunk):
        idx = range(s, min(s + chunk, len(rows)))
        rngs = [np.random.default_rng([*seed, i]) for i in idx]
        u = np.stack([g.random(16) for g in rngs]).astype(np.float32)
        noise = np.stack([g.standard_normal((cfg.image_size,) * 2 + (3,), np.float32) for g in rngs]) \
            if perturb else None
        out[s:s + len(idx)] = _draw(rows[s:s + len(idx)], u, noise, cfg, hue0)
    return out


def _draw(rows: np.ndarray, u: np.ndarray, noise: np.ndarray | None, cfg: WorldConfig,
          hue0: float) -> np.ndarray:
    n, S, ss = len(rows), cfg.image_size, 2          # 2x2 supersampling: smooth edges, cheap enough
    G = S * ss
    col = lambda k: u[:, k, None, None]              # noqa: E731  per-image scalar, broadcast on pixels
    c = (np.arange(G, dtype=np.float32) + 0.5) / ss
    X, Y = c[None, None, :], c[None, :, None]
    p = np.array([BODIES[i][1] for i in rows[:, 0]], np.float32)[:, None, None]
    taper = np.array([BODIES[i][2] for i in rows[:, 0]], np.float32)[:, None, None]
    aspect = np.array([ORDERS[i][0] for i in rows[:, 1]], np.float32)[:, None, None]
    tail = np.array([("fan", "fork", "round").index(ORDERS[i][1]) for i in rows[:, 1]])[:, None, None]
    # pose: rotation, log-uniform scale, shift, mirror
    ang = np.deg2rad(cfg.rotation * (2 * col(0) - 1))
    lo, hi = float(np.log(cfg.scale[0])), float(np.log(cfg.scale[1]))  # python floats keep float32
    sc = np.exp(lo + (hi - lo) * col(1))
    cx, cy = S / 2 + cfg.shift * S * (2 * col(2) - 1), S / 2 + cfg.shift * S * (2 * col(3) - 1)
    mir = np.where(col(4) < 0.5, np.float32(-1), np.float32(1)) if cfg.mirror else 1.0
    a = 0.30 * S * sc                                 # half-length of the body in pixels
    b = a / aspect
    dx, dy = X - cx, Y - cy
    # body x in [-1, 1], tail in [-0.85 - TAIL, -0.85]: shift so body + tail sit centred on (cx, cy)
    x = (dx * np.cos(ang) + dy * np.sin(ang)) * mir / a - TAIL / 2 + 0.075
    yr = (dx * np.sin(ang) - dy * np.cos(ang)) / b    # image y points down, body y up
    y = yr / np.maximum(1 + taper * x, 0.1)           # egg: wider at the head
    r = np.empty_like(x)
    for pv in np.unique(p):     # one exponent per body plan; p = 2 without pow, which is slow
        m = p[:, 0, 0] == pv
        xs, ys = np.abs(x[m]), np.abs(y[m])
        r[m] = np.sqrt(xs * xs + ys * ys) if pv == 2 else (xs ** pv + ys ** pv) ** (1 / pv)
    inside = r < 1
    t = (-0.85 - x) / TAIL                            # 0 where the tail joins, 1 at its end
    fan = (t >= 0) & (t <= 1) & (np.abs(yr) < 0.25 + 0.65 * t)
    tails = np.where(tail == 0, fan, np.where(tail == 1, fan & (np.abs(yr) >= 0.7 * t - 0.15),
                     ((x + 0.85 + TAIL / 2) / (TAIL / 2)) ** 2 + (yr / 0.8) ** 2 < 1))
    # genus pattern, in body coordinates
    pat = np.zeros_like(inside)
    for k, name in enumerate(PATTERNS[1:], 1):
        m = np.array([GENERA[g][0] == name for g in rows[:, 3]])
        if not m.any():
            continue
        xs, ys, rs = x[m], y[m], r[m]
        pat[m] = {"bands": lambda: (xs + 1) * 1.6 % 1 < 0.38,
                  "spots": lambda: ((xs * 2.2 % 1 - 0.5) ** 2 + ((ys * 1.6 + 0.5) % 1 - 0.5) ** 2) < 0.06,
                  "stripe": lambda: np.abs(ys) < 0.28,
                  "saddle": lambda: ys > 0.1,
                  "ring": lambda: np.abs(rs - 0.62) < 0.13,
                  "cap": lambda: xs > 0.5,
                  "chevron": lambda: (xs + 0.8 * np.abs(ys)) * 1.8 % 1 < 0.4}[name]()
    # species mark: a disc at a fixed place of the body, radius in pixels
    mpos = np.array([MARK_POSITIONS[MARKS[i][0]] for i in rows[:, 4]], np.float32)
    mx, my = mpos[:, 0, None, None], mpos[:, 1, None, None]
    d2 = ((x - mx) * a) ** 2 + ((yr - my * (1 + taper * mx)) * b) ** 2
    mark = inside & (d2 < (cfg.mark_size * S * sc) ** 2)
    label = np.where(mark, 3, np.where(inside & pat, 2, np.where(inside | tails, 1, 0))).astype(np.int8)

    # colours: palette per image (background, body, pattern, mark)
    cj = cfg.colour_jitter * (1.6 if noise is not None else 1.0)
    hue = np.array([_hue(f, hue0) for f in rows[:, 2]], np.float32) + 0.025 * cfg.colour_jitter * (2 * u[:, 10] - 1)
    base = _hsv(hue % 1, np.clip(0.7 * (1 + 0.15 * cj * (2 * u[:, 11] - 1)), 0, 1), np.full(n, 0.85, np.float32))
    dark = np.array([GENERA[g][1] == "dark" for g in rows[:, 3]])[:, None]
    patc = np.where(dark, base * 0.45, base * 0.4 + 0.6)
    mc = np.array([MARKS[i][1] for i in rows[:, 4]])[:, None]
    markc = np.where(mc == "black", 0.06, np.where(mc == "white", 0.97, _hsv((hue + 0.5) % 1, np.full(n, 0.9),
                                                                          np.full(n, 0.95))))
    markc = cfg.mark_contrast * markc + (1 - cfg.mark_contrast) * base  # blend toward the body colour
    gain = (1 + 0.12 * cj * (2 * u[:, 12] - 1))[:, None]
    if noise is None:   # clean: muted background
        bg = _hsv(u[:, 5], 0.2 * u[:, 6], 0.6 + 0.35 * u[:, 7])
        amp = 0.12 * (2 * u[:, 9] - 1)
    else:               # perturbed: any colour, stronger gradient
        bg = _hsv(u[:, 5], u[:, 6], 0.15 + 0.85 * u[:, 7])
        amp = 0.3 * (2 * u[:, 9] - 1)
    pal = np.stack([bg, base * gain, patc * gain, markc * gain], 1).astype(np.float32)  # (n, 4, 3)
    img = pal[np.arange(n)[:, None, None], label]                                        # (n, G, G, 3)
    phi = 2 * np.pi * col(8)
    grad = amp[:, None, None] * 2 * (np.cos(phi) * (X / S - 0.5) + np.sin(phi) * (Y / S - 0.5))
    img += ((label == 0) * grad)[..., None]
    img = sum(img[:, i::ss, j::ss] for i in range(ss) for j in range(ss)) / (ss * ss)
    if noise is not None:
        img = _blur(img, np.where(u[:, 15] < 0.6, 1.2 * u[:, 14], 0.0)) + 0.1 * u[:, 13, None, None, None] * noise
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _blur(img: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Separable Gaussian blur with a per-image sigma (pixels), 5 taps, edges replicated."""
    k = np.arange(-2, 3, dtype=np.float32)
    w = np.exp(-k ** 2 / (2 * np.maximum(sigma, 0.05)[:, None] ** 2))
    w /= w.sum(1, keepdims=True)
    for axis in (1, 2):
        pad = np.pad(img, [(0, 0)] + [(2, 2) if a == axis else (0, 0) for a in (1, 2)] + [(0, 0)], mode="edge")
        n = img.shape[axis]
        img = sum(w[:, j, None, None, None] * np.take(pad, range(j, j + n), axis=axis) for j in range(5))
    return img


# -- the dataset on disk ----------------------------------------------------------------------------------
CSV_COLUMNS = ("file_name", "class", "order", "family", "genus", "specific_epithet")


def write_dataset(out_dir: str | Path, cfg: WorldConfig = WorldConfig(), *, progress: bool = False) -> Path:
    """Write the world's long-tailed dataset; return the path of its `metadata.csv`.

    `images/<Genus>_<epithet>_<k>.png` plus `metadata.csv` in the generic-CSV layout of
    ../shared/data/cub-birds (`file_name,class,order,family,genus,specific_epithet`), read by the same
    reader as real data, and `world.json` (the config and its hash). Same config, same bytes. Idempotent:
    a folder already written with the same config hash is left as it is; one written with another config
    is rewritten (only our own files); a non-empty folder we did not write is an error. Concurrent calls
    on one folder (two benchmark runs started together) take turns on a lock file beside it: the second
    finds the first's finished dataset instead of deleting its images mid-write.
    """
    from filelock import FileLock
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(out.parent / f".{out.name}.lock"):
        return _write_dataset(out, cfg, progress)


def _write_dataset(out: Path, cfg: WorldConfig, progress: bool) -> Path:
    marker, meta = out / "world.json", out / "metadata.csv"
    h = cfg.hash()
    if marker.exists():
        old = json.loads(marker.read_text())
        if old.get("hash") == h and old.get("complete") and meta.exists():
            return meta
        shutil.rmtree(out / "images", ignore_errors=True)  # ours: world.json says we wrote this folder
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty and has no world.json, so it is not a synthetic dataset "
                              f"folder written by write_dataset; give a new or empty folder")
    (out / "images").mkdir(parents=True, exist_ok=True)
    info = {"generator_version": GENERATOR_VERSION, "hash": h, "config": cfg.to_dict(), "complete": False}
    marker.write_text(json.dumps(info, indent=1))      # a write killed half-way is redone next time
    world = make_world(cfg)
    rows = []
    it = enumerate(world.lineages)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, total=len(world.lineages), desc="synthetic dataset", unit="species")
    for j, lin in it:
        images = world.render(j, world.counts[lin], seed=(cfg.seed, STREAMS["dataset"], j))
        for k, im in enumerate(images):
            name = f"images/{lin[-2]}_{lin[-1]}_{k:03d}.png"
            Image.fromarray(im).save(out / name, format="PNG")
            rows.append((name, *lin))
    with open(meta, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        w.writerows(rows)
    info.update(complete=True, species=len(world.lineages), images=len(rows),
                few_shot={"1": sum(v == 1 for v in world.counts.values()),
                          "2-5": sum(2 <= v <= 5 for v in world.counts.values())})
    marker.write_text(json.dumps(info, indent=1))
    return meta
