"""How far the synthetic world's oracle can be trusted: accuracy per rank and Frechet distances.

Prints a Markdown table and writes benchmarks/results/oracle_table.json:
- accuracy per rank on held-out clean renders, perturbed renders, sibling-swapped renders (labelled with
  species a, drawn with the mark of a congeneric b: species accuracy must collapse, genus must hold) and
  pure noise (must sit at chance, 1 / number of taxa of the rank);
- the oracle's training time (stored when it was trained; retrain with --retrain to measure again);
- oracle Frechet distances (torchmetrics FID on oracle features): two disjoint sets of real renders
  (small), real against renders of a sibling species, of another genus of the same family, of another
  family of the same order, against perturbed renders of the same species, and against noise (large);
- render throughput (10k images, clean and perturbed).

    HF_HUB_OFFLINE=1 python benchmarks/oracle_table.py [--retrain] [--cache-dir DIR] [--n 2000]
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from taxadiffusion.datasets.synthetic import RANKS, WorldConfig
from taxadiffusion.evaluation.oracle import (OracleConfig, cache_root, evaluate, load_or_train_oracle,
                                             oracle_frechet)

OUT = Path(__file__).parent / "results" / "oracle_table.json"


def swapped(oracle, n: int, seed: int) -> dict[str, float]:
    """Accuracy on images of a's genus with a sibling's mark, scored as a."""
    world = oracle.world
    rng = np.random.default_rng(seed)
    with_sib = [i for i in range(len(world.lineages)) if world.siblings(i)]
    a = rng.choice(with_sib, n)
    b = [int(rng.choice(world.siblings(i))) for i in a]
    imgs = np.concatenate([world.render_swap(int(i), j, 1, seed=(seed, k)) for k, (i, j) in enumerate(zip(a, b))])
    return oracle.score(imgs, [int(i) for i in a])


def noise(oracle, n: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    s = oracle.world.cfg.image_size
    imgs = rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8)
    return oracle.score(imgs, list(rng.integers(0, len(oracle.world.lineages), n)))


def frechet_rows(oracle, n: int) -> dict[str, float]:
    """Real = the first species of each order; each other set replaces it by a relative at one rank.

    One species per order keeps every relative (a sibling, a species of another genus of the family, of
    another family of the order) outside the real set, so the sets differ exactly at that rank.
    """
    world = oracle.world
    lin = world.lineages
    first: dict[tuple[str, ...], int] = {}
    for i, l in enumerate(lin):
        first.setdefault(l[:2], i)
    base = list(first.values())

    def relative(i: int, level: int) -> int:
        """The first species sharing i's lineage above `level` but not at it."""
        return next(j for j, l in enumerate(lin) if l[:level] == lin[i][:level] and l[level] != lin[i][level])

    ids = [base[k % len(base)] for k in range(n)]
    real = world.render(ids, seed=(101,))
    rng = np.random.default_rng(0)
    out = {"real vs real (disjoint renders)": oracle_frechet(oracle, real, world.render(ids, seed=(102,)))}
    for name, level in (("sibling species", 4), ("other genus, same family", 3),
                        ("other family, same order", 2)):
        out[f"real vs {name}"] = oracle_frechet(oracle, real, world.render([relative(i, level) for i in ids],
                                                                           seed=(103,)))
    out["real vs perturbed renders (same species)"] = oracle_frechet(
        oracle, real, world.render(ids, seed=(104,), perturb=True))
    out["real vs uniform noise"] = oracle_frechet(oracle, real, rng.integers(0, 256, real.shape, dtype=np.uint8))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--retrain", action="store_true", help="delete the cached oracle and train it again")
    ap.add_argument("--cache-dir", default=None, help="oracle cache (default $TAXADIFFUSION_CACHE/oracle)")
    ap.add_argument("--n", type=int, default=2000, help="images per accuracy row")
    ap.add_argument("--fid-n", type=int, default=1000, help="images per set for the Frechet distances")
    a = ap.parse_args()
    wcfg, ocfg = WorldConfig(), OracleConfig()
    cached = Path(a.cache_dir or cache_root()) / ocfg.key(wcfg)
    if a.retrain and cached.exists():
        shutil.rmtree(cached)
    oracle = load_or_train_oracle(wcfg, cache_dir=a.cache_dir, cfg=ocfg)
    world = oracle.world
    tax = world.taxonomy

    t = time.perf_counter()
    ids = list(np.arange(10_000) % len(world.lineages))
    world.render(ids, seed=(7,))
    t_clean = time.perf_counter() - t
    t = time.perf_counter()
    world.render(ids, seed=(7,), perturb=True)
    t_pert = time.perf_counter() - t

    rows = {"held-out clean renders": evaluate(oracle, a.n, perturb=False, seed=1),
            "held-out perturbed renders": evaluate(oracle, a.n, perturb=True, seed=1),
            "sibling-swapped renders (label: a)": swapped(oracle, a.n, seed=3),
            "uniform noise": noise(oracle, a.n, seed=4),
            "chance (1 / taxa)": {r: 1 / tax.size(l) for l, r in enumerate(RANKS)}}
    fr = frechet_rows(oracle, a.fid_n)
    result = {"world": wcfg.to_dict(), "world_hash": wcfg.hash(), "taxa": tax.summary(),
              "oracle": asdict(ocfg), "oracle_key": ocfg.key(wcfg), "trained_now": oracle.trained,
              "train_seconds": oracle.info["train_seconds"],
              "train_cpu_seconds": oracle.info.get("train_cpu_seconds"),
              "stored_accuracy_clean": oracle.info["accuracy_clean"],
              "stored_accuracy_perturbed": oracle.info["accuracy_perturbed"],
              "accuracy": rows, "frechet": fr, "images_per_row": a.n, "frechet_images_per_set": a.fid_n,
              "render_seconds_10k": {"clean": round(t_clean, 2), "perturbed": round(t_pert, 2)},
              "torch_threads": torch.get_num_threads()}
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1))

    print(f"world {wcfg.hash()}: {tax.summary()}; oracle {ocfg.key(wcfg)} "
          f"({'trained now' if oracle.trained else 'from cache'}), training took "
          f"{oracle.info['train_seconds']:.0f} s wall, {oracle.info.get('train_cpu_seconds', 0):.0f} s CPU\n")
    print("| oracle accuracy | " + " | ".join(RANKS) + " |\n|---|" + "---|" * len(RANKS))
    for name, acc in rows.items():
        print(f"| {name} | " + " | ".join(f"{acc[r]:.3f}" for r in RANKS) + " |")
    print("\n| oracle Frechet distance | value |\n|---|---|")
    for name, v in fr.items():
        print(f"| {name} | {v:.2f} |")
    print(f"\nrender 10k images: clean {t_clean:.1f} s, perturbed {t_pert:.1f} s\nwrote {OUT}")


if __name__ == "__main__":
    main()
