"""Scoring generated images with the trained judge (judge.py): per-rank accuracy, FID and KID in its
trunk features. Images come as {taxon: uint8} dicts or stream.TaxonImages; each taxon is read once,
and only the matched real rows are read (stream.matched_subset), so a level never sits in memory.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from typing import TYPE_CHECKING, Mapping

import torch

from ..taxonomy import Taxon, Taxonomy
from .oracle import OracleFeatures, feed
from .stream import count, matched_subset
from .tables import taxon_seed

if TYPE_CHECKING:
    from .judge import Judge


class FrechetKid:
    """torchmetrics FID and KID on the judge's trunk features, fed batch by batch (`update`) once the
    sizes of both sides are known (KID's subset size depends on them). FID needs 2 images a side;
    `fid_small_n` flags no more images than feature dims (rank-deficient covariance, biased upward:
    prefer KID there)."""

    def __init__(self, judge: "Judge", n_real: int, n_gen: int, seed: int = 0,
                 kid_subset_size: int = 1000, kid_subsets: int = 100):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance
        d = judge.net.num_features
        self.seed, self.metrics = seed, []
        self.out = {"n_real": n_real, "n_gen": n_gen, "dims": d, "fid": None,
                    "fid_small_n": min(n_real, n_gen) <= d, "kid_mean": None, "kid_std": None,
                    "kid_subset_size": None, "kid_subsets": None}
        if min(n_real, n_gen) < 2:
            self.out["note"] = "fewer than 2 images on a side: FID/KID undefined"
            return
        m = min(kid_subset_size, n_real, n_gen)
        subsets = kid_subsets if (m < n_real or m < n_gen) else 1   # every subset would be the same draw
        # OracleFeatures only reads .net.trunk, .net.num_features and .size: the judge has all three
        fid = FrechetInceptionDistance(feature=OracleFeatures(judge), reset_real_features=True)
        with warnings.catch_warnings():   # "KID keeps every feature in memory": 4 x width floats an image
            warnings.filterwarnings("ignore", "Metric `Kernel Inception Distance` will save", UserWarning)
            kid = KernelInceptionDistance(feature=OracleFeatures(judge), subsets=subsets, subset_size=m,
                                          reset_real_features=True)
        self.metrics = [fid, kid]
        self.out.update(kid_subset_size=m, kid_subsets=subsets)

    def update(self, images: torch.Tensor, real: bool) -> None:
        for metric in self.metrics:
            feed(metric, images, real)

    def result(self) -> dict:
        if not self.metrics:
            return dict(self.out)
        fid, kid = self.metrics
        with torch.random.fork_rng():   # KID draws its subsets from torch's global RNG
            torch.manual_seed(self.seed)
            k_mean, k_std = kid.compute()
        return {**self.out, "fid": float(fid.compute()), "kid_mean": float(k_mean), "kid_std": float(k_std)}


def judge_frechet_kid(judge: "Judge", real: torch.Tensor, fake: torch.Tensor, seed: int = 0,
                      kid_subset_size: int = 1000, kid_subsets: int = 100) -> dict:
    """FID and KID between two uint8 image sets in the judge's trunk features (see `FrechetKid`)."""
    acc = FrechetKid(judge, len(real), len(fake), seed, kid_subset_size, kid_subsets)
    if acc.metrics:
        acc.update(real, True)
        acc.update(fake, False)
    return acc.result()


def _match(x: torch.Tensor, m: int, seed: int) -> torch.Tensor:
    if m >= len(x):
        return x
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:m].sort().values]


def _level(judge: "Judge", gen: Mapping, real: Mapping, under: Mapping, taxonomy: Taxonomy, lvl: int,
           seed: int, per_species: dict) -> dict:
    """One level's accuracy and FID/KID: the pools are matched per taxon, min(n_gen, n_real) a side."""
    taxa = sorted(t for t in gen if t.level == lvl and count(gen, t))
    m = {t: min(count(gen, t), sum(count(real, s) for s in under[t.path])) for t in taxa if under.get(t.path)}
    fk = FrechetKid(judge, sum(m.values()), sum(m.values()), seed=seed)
    hits, n = torch.zeros(lvl + 1), 0
    for t in taxa:
        images = gen[t]
        ok = (judge.predict(images)[:, : lvl + 1] == torch.tensor(taxonomy.ids(t))).float()
        hits += ok.sum(0)
        n += len(ok)
        if lvl == taxonomy.num_levels - 1:
            per_species[t] = {"species_acc": float(ok[:, -1].mean()), "n": len(ok),
                              "accuracy": {r: float(a) for r, a in zip(taxonomy.ranks, ok.mean(0))}}
        if t in m and fk.metrics:   # match: the same taxon mix on both sides (fid_by_level "match")
            fk.update(matched_subset(real, under[t.path], m[t], taxon_seed(seed + 1, t)), True)
            fk.update(_match(images, m[t], taxon_seed(seed, t)), False)
    return {"level": lvl, "n_taxa": len(taxa), "n_images": n, "n_taxa_with_real": len(m),
            "accuracy": {taxonomy.ranks[i]: float(h / n) if n else None for i, h in enumerate(hits)},
            **fk.result()}


def judge_result(judge: "Judge", gen: Mapping[Taxon, torch.Tensor], real: Mapping[Taxon, torch.Tensor],
                 taxonomy: Taxonomy, settings: Mapping, seed: int = 0) -> dict:
    """Judge accuracy per rank (ranks <= the conditioned level), FID/KID in its features per level,
    per-species accuracy, and the judge's own held-out accuracy (the ceiling); with provenance."""
    from .judge import taxonomy_digest
    from .weights import file_identity, provenance
    if judge.info.get("taxonomy_digest") != taxonomy_digest(taxonomy):
        raise ValueError(f"the judge in {judge.path} was trained for another taxonomy than the model's")
    under: dict[tuple[str, ...], list[Taxon]] = defaultdict(list)   # taxon path -> real species under it
    for s in real:
        for lvl in range(s.level + 1):
            under[s.path[: lvl + 1]].append(s)
    per_species: dict[Taxon, dict] = {}
    levels = {taxonomy.ranks[lvl]: _level(judge, gen, real, under, taxonomy, lvl, seed, per_species)
              for lvl in sorted({t.level for t in gen})}
    info = judge.info
    ident = {**file_identity(judge.path / "judge.safetensors"), "key": info["key"]}
    ceiling = {"held_out_accuracy": info.get("held_out_accuracy"),
               "held_out_majority_baseline": info.get("held_out_majority_baseline"),
               "train_accuracy": info.get("train_accuracy"), "split": info["split"]}
    definition = (
        "Judge accuracy: a small CNN (OracleNet trunk, one head per rank) trained from scratch on a "
        "seeded per-species split of the dataset's real photos (~80% train / 20% held out for species "
        "with >= 2 images), with random resized crops, flips, colour jitter and blur; it predicts every "
        "rank of each generated image, and accuracy at rank r is the fraction of images conditioned on "
        "a taxon of level >= r whose rank-r prediction is that taxon's ancestor. Read it against the "
        "judge's held-out accuracy on real photos (`ceiling`), which bounds it. Frechet/KID: torchmetrics "
        "FID and KID on the judge's trunk features, generated images of the level's taxa vs the real "
        "images under them, min(n_gen, n_real) per taxon on each side (seeded); the real images include "
        "the judge's own training photos.")
    return {"kind": "judge", "levels": levels, "per_species": per_species, "ceiling": ceiling,
            "provenance": provenance("judge", "torchmetrics", {"judge": ident},
                                     {**settings, "judge": info["train"], "balance": "match",
                                      "kid_subset_size_max": 1000, "kid_subsets": 100, "seed": seed},
                                     judge.size, definition)}
