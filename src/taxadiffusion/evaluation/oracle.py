"""The synthetic world's oracle: a small CNN that names every rank of a rendered species (DESIGN.md).

It plays the part BioCLIP plays on real data, with ground truth we control: `score` gives per-rank accuracy
of generated images against the lineages they were asked for, `features` give a feature space for a
Frechet distance on the synthetic world (`oracle_frechet`, through torchmetrics' FID with `OracleFeatures`
as the custom feature extractor).

Training uses fresh renders only (the generator gives unlimited data), half of them perturbed (saturated
backgrounds, noise, blur): generated samples drift in ways renders never do, and an oracle trained on clean
renders alone would score style instead of traits (DESIGN.md, "The synthetic world's oracle"). It is
cached as safetensors + JSON under `$TAXADIFFUSION_CACHE/oracle/<key>/` (default
`~/.cache/taxadiffusion/oracle/<key>/`), the key a hash of the world config (with the generator version)
and the oracle's training config, and retrained only when one of those changes.

Image convention: uint8, torch tensors channel-first (N, 3, H, W); numpy arrays channel-last (N, H, W, 3),
as `World.render` returns them. Anything else (floats, other sizes) is an error, never a guess.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..datasets.synthetic import RANKS, STREAMS, World, WorldConfig, make_world

ORACLE_VERSION = 1   # part of the cache key: bump when the network or the training recipe changes
TARGET_SPECIES_ACCURACY = 0.98


@dataclass(frozen=True)
class OracleConfig:
    """How the oracle is trained (part of the cache key)."""

    steps: int = 1200
    batch_size: int = 128
    width: int = 32                 # channels of the first block; the net is width, 2w, 2w, 4w, 4w
    lr: float = 3e-3                # AdamW, one-cycle schedule
    perturbed: float = 0.5          # fraction of training renders that are perturbed
    chunk: int = 4096               # renders per fresh chunk; each is used as is and mirrored
    eval_images: int = 2000         # held-out renders, clean and perturbed, for the stored accuracy
    seed: int = 0

    def key(self, world: WorldConfig) -> str:
        blob = json.dumps({"oracle": ORACLE_VERSION, "world": world.hash(), **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _block(i: int, o: int) -> list[nn.Module]:
    return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]


class OracleNet(nn.Module):
    """Conv trunk -> (N, 4w) features -> one linear head per rank."""

    def __init__(self, sizes: Sequence[int], width: int = 32):
        super().__init__()
        w = width
        self.trunk = nn.Sequential(
            *_block(3, w), nn.MaxPool2d(2), *_block(w, 2 * w), *_block(2 * w, 2 * w), nn.MaxPool2d(2),
            *_block(2 * w, 4 * w), nn.MaxPool2d(2), *_block(4 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = 4 * w
        self.heads = nn.ModuleList(nn.Linear(4 * w, n) for n in sizes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        f = self.trunk(x)
        return f, [h(f) for h in self.heads]


def as_input(images: torch.Tensor | np.ndarray, size: int) -> torch.Tensor:
    """uint8 images (see the module docstring) -> float (N, 3, size, size) in [-1, 1]."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"numpy images must be uint8 (N, H, W, 3); got {images.dtype} {images.shape}")
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 \
            or images.shape[1] != 3:
        got = f"{images.dtype} {tuple(images.shape)}" if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"torch images must be uint8 (N, 3, H, W); got {got} "
                         f"(from [-1, 1] floats: ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))")
    if images.shape[-2:] != (size, size):
        raise ValueError(f"the oracle was trained on {size}x{size} renders; got {tuple(images.shape[-2:])}")
    return images.float().div(127.5).sub(1).contiguous(memory_format=torch.channels_last)


class Oracle:
    """A trained oracle for one world. `trained` is True when this process trained it (not from cache)."""

    def __init__(self, net: OracleNet, world: World, info: dict, path: Path, trained: bool):
        self.net, self.world, self.info, self.path, self.trained = net.eval(), world, info, path, trained
        self.size = world.cfg.image_size

    @torch.no_grad()
    def _run(self, images, batch_size: int = 512) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = as_input(images, self.size)
        outs = [self.net(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        return (torch.cat([o[0] for o in outs]),
                [torch.cat([o[1][l] for o in outs]) for l in range(len(RANKS))])

    def predict(self, images) -> torch.Tensor:
        """(N, levels) long: each rank's predicted vocabulary id (taxonomy ids; heads are independent)."""
        return torch.stack([lg.argmax(1) for lg in self._run(images)[1]], 1)

    def features(self, images) -> torch.Tensor:
        """(N, D) float features of the trunk (D = `num_features`)."""
        return self._run(images)[0]

    def lineage_ids(self, lineages: Sequence) -> torch.Tensor:
        """(N, levels) true ids of species references (Taxon, lineage tuple, binomial or species id)."""
        tax = self.world.taxonomy
        return torch.tensor([tax.ids(tax.species[self.world.species_id(r)]) for r in lineages])

    def score(self, images, lineages: Sequence) -> dict[str, float]:
        """Per-rank accuracy of `images` against the species they should show (one reference per image)."""
        if len(lineages) != len(images):
            raise ValueError(f"{len(images)} images but {len(lineages)} lineages")
        hit = (self.predict(images) == self.lineage_ids(lineages)).float().mean(0)
        return {r: float(h) for r, h in zip(RANKS, hit)}


class OracleFeatures(nn.Module):
    """The oracle's trunk as torchmetrics' custom FID feature extractor.

    torchmetrics 1.9 (`image/fid.py`) takes any nn.Module as `feature=`, reads its `num_features` (int) to
    size its states, and calls it on exactly what `update()` receives: here uint8 (N, 3, H, W). It stays in
    eval mode (BatchNorm statistics frozen) like torchmetrics' own NoTrainInceptionV3.
    """

    def __init__(self, oracle: Oracle):
        super().__init__()
        self.trunk, self.size = oracle.net.trunk, oracle.size
        self.num_features = oracle.net.num_features
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "OracleFeatures":
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(as_input(images, self.size))


def frechet_metric(oracle: Oracle):
    """An empty torchmetrics FID on the oracle's trunk features, to `feed` batch by batch."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    return FrechetInceptionDistance(feature=OracleFeatures(oracle), reset_real_features=True)


def feed(metric, imgs, real: bool, batch_size: int = 500) -> None:
    """Update a torchmetrics FID/KID with uint8 images: a torch (N, 3, H, W) or numpy (N, H, W, 3) array."""
    t = imgs if isinstance(imgs, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2)
    for i in range(0, len(t), batch_size):
        metric.update(t[i:i + batch_size], real=real)


def oracle_frechet(oracle: Oracle, real, fake, batch_size: int = 500) -> float:
    """Frechet distance between two image sets in the oracle's feature space (torchmetrics FID)."""
    fid = frechet_metric(oracle)
    feed(fid, real, True, batch_size)
    feed(fid, fake, False, batch_size)
    return float(fid.compute())


def oracle_result(oracle: Oracle, gen, real, taxonomy, settings: dict) -> dict:
    """Oracle accuracy per rank (ranks <= the conditioned level) and oracle Frechet distance per level.

    `gen`/`real`: {taxon: uint8 images}, dicts or stream.TaxonImages; each taxon's images are read once
    and fed to the level's FID as they come (torchmetrics keeps sums, not images)."""
    from .weights import provenance
    wt = oracle.world.taxonomy
    levels: dict[str, dict] = {}
    per_species: dict = {}
    for lvl in sorted({t.level for t in gen}):
        taxa = [t for t in gen if t.level == lvl]
        fid, hits, n = frechet_metric(oracle), torch.zeros(lvl + 1), 0
        for t in taxa:
            images = gen[t]
            feed(fid, images, False)
            ok = (oracle.predict(images)[:, : lvl + 1] == torch.tensor(wt.ids(wt.make(t.path)))).float()
            hits += ok.sum(0)
            n += len(ok)
            if t.level == taxonomy.num_levels - 1:
                per_species[t] = {"species_acc": float(ok[:, -1].mean()), "genus_acc": float(ok[:, -2].mean())
                                  if lvl else None, "n": len(ok)}
        paths = {t.path for t in taxa}
        for s in real:   # every real image under the level's taxa
            if s.path[: lvl + 1] in paths:
                feed(fid, real[s], True)
        levels[taxonomy.ranks[lvl]] = {"level": lvl, "n_taxa": len(taxa), "n_images": n,
                                       "accuracy": {taxonomy.ranks[i]: float(h / n) for i, h in enumerate(hits)},
                                       "frechet": float(fid.compute())}
    definition = ("Oracle accuracy: the synthetic world's oracle CNN (trained on renders, >=98% species "
                  "accuracy on held-out renders) predicts every rank of each generated image; accuracy "
                  "at rank r is the fraction of images conditioned on a taxon of level >= r whose rank-r "
                  "prediction is that taxon's ancestor. Frechet: torchmetrics FID computed on the "
                  "oracle's trunk features, generated images of the level's taxa vs all real images "
                  "under them.")
    info = {"path": str(oracle.path), "key": oracle.info.get("key"),
            "accuracy_clean": oracle.info.get("accuracy_clean")}
    return {"kind": "oracle", "levels": levels, "per_species": per_species,
            "provenance": provenance("oracle", "torchmetrics", {"oracle": info}, settings,
                                     oracle.size, definition)}


# -- training and the cache ----------------------------------------------------------------------------
def cache_root() -> Path:
    from ..backbone import cache_root as root
    return root() / "oracle"


def _renders(world: World, n: int, seed: tuple[int, ...], perturbed: float) -> tuple[np.ndarray, np.ndarray]:
    """n fresh renders of uniformly drawn species, the first `perturbed` fraction perturbed; and their ids."""
    ids = np.random.default_rng(list(seed)).integers(0, len(world.lineages), n)
    k = int(round(n * perturbed))
    imgs = np.concatenate([world.render(list(ids[:k]), seed=(*seed, 1), perturb=True) if k else
                           np.empty((0, world.cfg.image_size, world.cfg.image_size, 3), np.uint8),
                           world.render(list(ids[k:]), seed=(*seed, 0))])
    return imgs, ids


def evaluate(oracle: Oracle, n: int, perturb: bool, seed: int = 0) -> dict[str, float]:
    """Accuracy per rank on n held-out renders (a seed stream training never uses)."""
    world = oracle.world
    ids = np.random.default_rng([world.cfg.seed, STREAMS["oracle-eval"], seed]).integers(0, len(world.lineages), n)
    imgs = world.render(list(ids), seed=(world.cfg.seed, STREAMS["oracle-eval"], seed, int(perturb)),
                        perturb=perturb)
    return oracle.score(imgs, list(ids))


def train_oracle(world: World, cfg: OracleConfig = OracleConfig(), progress: bool = True) -> OracleNet:
    """Train on fresh renders: each chunk is used as rendered and mirrored (a mirror is a valid render)."""
    from tqdm import tqdm
    torch.manual_seed(cfg.seed)
    tax = world.taxonomy
    net = OracleNet([tax.size(l) for l in range(len(RANKS))], cfg.width).to(memory_format=torch.channels_last)
    labels = torch.tensor([tax.ids(t) for t in tax.species])           # species id -> per-level ids
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.15)
    per_chunk = max(1, 2 * cfg.chunk // cfg.batch_size) if world.cfg.mirror else max(1, cfg.chunk // cfg.batch_size)
    net.train()
    bar = tqdm(range(cfg.steps), desc="training oracle", unit="step", disable=not progress)
    for step in bar:
        if step % per_chunk == 0:
            imgs, ids = _renders(world, cfg.chunk, (world.cfg.seed, STREAMS["oracle-train"], cfg.seed,
                                                    step // per_chunk), cfg.perturbed)
            x_all = as_input(imgs, world.cfg.image_size)
            if world.cfg.mirror:
                x_all, ids = torch.cat([x_all, x_all.flip(3)]), np.concatenate([ids, ids])
            y_all = labels[torch.from_numpy(ids)]
            order = torch.randperm(len(x_all))
        sel = order[(step % per_chunk) * cfg.batch_size:][:cfg.batch_size]
        _, logits = net(x_all[sel])
        loss = sum(F.cross_entropy(lg, y_all[sel, l]) for l, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return net.eval()


def load_or_train_oracle(world_cfg: WorldConfig = WorldConfig(), cache_dir: str | Path | None = None,
                         cfg: OracleConfig = OracleConfig(), progress: bool = True) -> Oracle:
    """The oracle of `world_cfg`: loaded from `<cache_dir or cache_root()>/<key>/`, else trained and stored.

    Training stores held-out accuracies (clean and perturbed renders) and the training time in
    `oracle.json`; a species accuracy below 98% on clean renders is warned about, not hidden.
    """
    world = make_world(world_cfg)
    key = cfg.key(world_cfg)
    path = Path(cache_dir) if cache_dir is not None else cache_root()
    path = path / key
    sizes = [world.taxonomy.size(l) for l in range(len(RANKS))]
    with cache_lock(path):  # a second process waits here, then loads what the first stored
        cached = load_cached_net(path, "oracle", sizes, cfg.width)
        if cached is not None:
            return Oracle(cached[0], world, cached[1], path, trained=False)

        t0, c0 = time.perf_counter(), time.process_time()
        net = train_oracle(world, cfg, progress)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        info = {"key": key, "oracle_version": ORACLE_VERSION, "world": world_cfg.to_dict(),
                "world_hash": world_cfg.hash(), "train": asdict(cfg), "train_seconds": round(seconds, 1),
                "train_cpu_seconds": round(cpu, 1),  # all threads: wall time depends on what else runs
                "torch_threads": torch.get_num_threads(), "ranks": list(RANKS), "sizes": sizes}
        oracle = Oracle(net, world, info, path, trained=True)
        info["accuracy_clean"] = evaluate(oracle, cfg.eval_images, perturb=False)
        info["accuracy_perturbed"] = evaluate(oracle, cfg.eval_images, perturb=True)
        if info["accuracy_clean"]["species"] < TARGET_SPECIES_ACCURACY:
            warnings.warn(f"oracle species accuracy on clean renders is {info['accuracy_clean']['species']:.3f}, "
                          f"below the {TARGET_SPECIES_ACCURACY} target: its verdicts on species are unreliable "
                          f"(train longer: OracleConfig.steps)")
        store_cached_net(path, "oracle", net, info)
        return oracle


def cache_lock(path: Path):
    """A lock beside cache entry `path`: one process trains and stores it while others wait."""
    from filelock import FileLock
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path.parent / f".{path.name}.lock")


def load_cached_net(path: Path, name: str, sizes: Sequence[int], width: int) -> tuple[OracleNet, dict] | None:
    """`path/<name>.safetensors` + `<name>.json` as (net, info), or None when not cached (the oracle's
    and the judge's cache entries)."""
    from safetensors.torch import load_file
    weights, meta = path / f"{name}.safetensors", path / f"{name}.json"
    if not (weights.exists() and meta.exists()):
        return None
    net = OracleNet(sizes, width)
    try:
        info = json.loads(meta.read_text())
        net.load_state_dict(load_file(weights))
    except Exception as e:  # a damaged entry is named, never silently retrained over
        raise RuntimeError(f"cached {name} in {path} is unreadable ({e}); delete that folder to "
                           f"train it again") from e
    return net.to(memory_format=torch.channels_last), info


def store_cached_net(path: Path, name: str, net: nn.Module, info: dict) -> None:
    """Write a cache entry beside `path`, then move it into place: a killed run never leaves a
    half-written entry."""
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp / f"{name}.safetensors")
    (tmp / f"{name}.json").write_text(json.dumps(info, indent=1))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
