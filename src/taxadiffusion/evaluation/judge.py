"""The real-data judge: a small CNN trained on a dataset's own photos that names every rank of an image.

On the synthetic world the oracle knows the truth (oracle.py); on real data nothing does, and BioCLIP,
Inception and AlexNet need weights a machine may not have. The judge fills that gap with what the data
itself provides: `OracleNet` (the oracle's conv trunk, one linear head per rank, labels = the model
taxonomy's vocabulary ids) trained from scratch on a seeded per-species split of the real images
(`split_records`: about 80% train / 20% held out for every species with >= 2 images; a single-image
species trains only). Its held-out accuracy per rank is stored with it and reported next to every
number it gives: it is the ceiling to read generated-sample accuracies against, and with a few photos
per species it is low (CUB subset: 195 species from 832 photos). For generated images `judge_result`
gives per-rank accuracy and a Frechet distance and KID in the judge's trunk features (torchmetrics FID
and KID with a custom feature module, as `oracle_frechet` does).

Augmentation (torchvision.transforms.v2, per image): random resized crops, horizontal flips (a bird
facing the other way is the same species), colour jitter, and sometimes a blur: generated samples are
blurrier and shifted in colour, and a judge trained only on crisp photos would score style instead of
identity (DESIGN.md, "The synthetic world's oracle", makes the same argument for renders).

Cached as safetensors + JSON under `backbone.cache_root()/judge/<key>/`; the key hashes the table's
records (path relative to the image root, file size, lineage, box), the taxonomy's vocabularies (they
define the label ids), the resolution, the preprocessing and `JudgeConfig`. Images: uint8 (N, 3, R, R).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.nn import functional as F

from ..datasets.table import Record, Table
from ..taxonomy import Taxon, Taxonomy
from .oracle import OracleNet, as_input, cache_lock, load_cached_net, store_cached_net
from .tables import taxon_seed

JUDGE_VERSION = 1   # part of the cache key: bump when the network, split or training recipe changes


@dataclass(frozen=True)
class JudgeConfig:
    """How the judge is trained (part of the cache key). 1000 steps: about 3 minutes at 32 px on a
    2-core machine another job keeps busy (CUB subset: 0.18 s per step, one torch thread); not yet
    measured on an idle machine."""

    steps: int = 1000
    batch_size: int = 64
    width: int = 32                 # OracleNet: width, 2w, 2w, 4w, 4w channels; 4w features
    lr: float = 3e-3                # AdamW, one-cycle schedule (as the oracle)
    weight_decay: float = 0.05      # few photos per species: regularise harder than the oracle
    label_smoothing: float = 0.1
    holdout: float = 0.2            # fraction of each species' images held out (>= 1 when it has >= 2)
    crop_scale: float = 0.5         # RandomResizedCrop area range (crop_scale, 1)
    jitter: float = 0.3             # ColorJitter brightness, contrast, saturation
    hue: float = 0.05
    blur: float = 0.25              # probability of a Gaussian blur (sigma 0.1-1.0 px)
    seed: int = 0


@dataclass
class Split:
    """The seeded per-species split: (record, species) pairs, and what was not used."""

    train: list[tuple[Record, Taxon]]
    held_out: list[tuple[Record, Taxon]]
    counts: dict[str, int]


def split_records(table: Table, taxonomy: Taxonomy, holdout: float = 0.2, seed: int = 0) -> Split:
    """Per species: images sorted by id, shuffled by a per-species seed (its lineage, not row order),
    round(holdout * n) (at least 1) held out when the species has >= 2 images. Records whose lineage
    is not a species of `taxonomy` are counted, never silently dropped."""
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    by: dict[Taxon, list[Record]] = defaultdict(list)
    unknown = 0
    for r in table.records:
        try:
            t = taxonomy.make(r.lineage)
        except KeyError:
            unknown += 1
            continue
        if t.level != taxonomy.num_levels - 1:
            unknown += 1   # shorter lineage (missing_ranks=keep): no species label
            continue
        by[t].append(r)
    train, held = [], []
    single = 0
    for t in sorted(by):
        recs = sorted(by[t], key=lambda r: r.image_id)
        random.Random(taxon_seed(seed, t)).shuffle(recs)
        k = max(1, int(holdout * len(recs) + 0.5)) if len(recs) >= 2 else 0
        single += len(recs) == 1
        held += [(r, t) for r in recs[:k]]
        train += [(r, t) for r in recs[k:]]
    return Split(train, held, {"species": len(by), "species_single_image": single,
                               "train_images": len(train), "held_out_images": len(held),
                               "unknown_lineage": unknown})


def taxonomy_digest(taxonomy: Taxonomy) -> str:
    """Hash of the ranks and every level's vocabulary (the label ids the heads predict)."""
    blob = json.dumps([list(taxonomy.ranks), [[list(t.path) for t in taxonomy.vocab(l)]
                                              for l in range(taxonomy.num_levels)]])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def judge_key(table: Table, taxonomy: Taxonomy, resolution: int, cfg: JudgeConfig = JudgeConfig()) -> str:
    """The cache key: records (relative path, file size, lineage, box), taxonomy, resolution, config.

    File sizes catch a re-encoded or replaced image under the same name without hashing every file;
    paths are relative to the image root so a moved dataset keeps its judge."""
    h = hashlib.sha256()
    for r in sorted(table.records, key=lambda r: r.path):
        size = os.stat(r.path).st_size if os.path.exists(r.path) else -1
        h.update(json.dumps([os.path.relpath(r.path, table.root), size, r.lineage, r.box]).encode())
    blob = json.dumps({"judge": JUDGE_VERSION, "records": h.hexdigest(), "taxonomy": taxonomy_digest(taxonomy),
                       "resolution": int(resolution), "preprocess": table.preprocess, **asdict(cfg)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Judge:
    """A trained judge. `trained` is True when this process trained it (not loaded from the cache)."""

    def __init__(self, net: OracleNet, taxonomy: Taxonomy, info: dict, path: Path, trained: bool):
        self.net, self.taxonomy, self.info, self.path, self.trained = net.eval(), taxonomy, info, path, trained
        self.size = int(info["resolution"])

    def _x(self, images: torch.Tensor) -> torch.Tensor:
        if torch.is_tensor(images) and images.ndim == 4 and tuple(images.shape[-2:]) != (self.size, self.size):
            raise ValueError(f"the judge was trained at {self.size}x{self.size}; got images of "
                             f"{tuple(images.shape[-2:])}")
        return as_input(images, self.size)

    @torch.no_grad()
    def _run(self, images: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self._x(images)
        outs = [self.net(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        return (torch.cat([o[0] for o in outs]),
                [torch.cat([o[1][l] for o in outs]) for l in range(self.taxonomy.num_levels)])

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(N, levels) long: each rank's predicted vocabulary id in the judge's taxonomy."""
        return torch.stack([lg.argmax(1) for lg in self._run(images)[1]], 1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 4 * width) trunk features."""
        return self._run(images)[0]

    def accuracy(self, images: torch.Tensor, species: Sequence[Taxon]) -> dict[str, float]:
        """Per-rank accuracy of `images` against the species (one per image) they show."""
        truth = torch.tensor([self.taxonomy.ids(t) for t in species])
        hit = (self.predict(images) == truth).float().mean(0)
        return {r: float(h) for r, h in zip(self.taxonomy.ranks, hit)}


# -- images, augmentation, training ---------------------------------------------------------------------
def load_split_images(pairs: Sequence[tuple[Record, Taxon]], preprocess: str, resolution: int,
                      progress: bool = True) -> tuple[torch.Tensor, list[Taxon], list[str]]:
    """uint8 (N, 3, R, R) with the evaluation preprocessing, their species, and unreadable paths."""
    from tqdm.auto import tqdm
    from ..datasets.images import PREPROCESS, load_image, to_tensor
    from ..imaging import uint8_from_unit
    fn = PREPROCESS[preprocess]
    imgs, species, bad = [], [], []
    for r, t in tqdm(pairs, desc="judge images", unit="img", leave=False, disable=not progress):
        try:
            img = load_image(r.path)
        except Exception:  # counted and reported in judge.json, as evaluate() counts real images
            bad.append(r.path)
            continue
        imgs.append(uint8_from_unit(to_tensor(fn(img, r.box, resolution, None))))
        species.append(t)
    x = torch.stack(imgs) if imgs else torch.empty(0, 3, resolution, resolution, dtype=torch.uint8)
    return x, species, bad


def augmenter(cfg: JudgeConfig, size: int):
    """The per-image training augmentation on uint8 (3, R, R) tensors (see the module docstring)."""
    from torchvision.transforms import v2
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(cfg.crop_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(cfg.jitter, cfg.jitter, cfg.jitter, cfg.hue),
        v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 1.0))], p=cfg.blur)])


class _Augmented(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, labels: torch.Tensor, aug):
        self.x, self.labels, self.aug = x, labels, aug

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.aug(self.x[i]), self.labels[i]


def train_judge(x: torch.Tensor, labels: torch.Tensor, sizes: Sequence[int], cfg: JudgeConfig = JudgeConfig(),
                progress: bool = True) -> OracleNet:
    """Train on uint8 images `x` (N, 3, R, R) with per-rank labels (N, levels); epochs of shuffled batches.

    Augmentation runs in one DataLoader worker, a single-threaded process beside the training step:
    many tiny per-image ops on several threads stall whenever another process holds a core (measured on
    a busy 2-core machine, augmenting in the training process: 3.1 s per step with 2 torch threads,
    0.24 s with 1). The worker's random stream comes from the loader's seeded generator and the initial
    weights from cfg.seed, so training is reproducible. On a busy machine one torch thread is still
    faster for this small net (0.18 s per step against 1.5 s with 2 threads)."""
    from tqdm.auto import tqdm
    if len(x) == 0:
        raise ValueError("the judge has no training image")
    size = x.shape[-1]
    loader = torch.utils.data.DataLoader(
        _Augmented(x, labels, augmenter(cfg, size)), batch_size=min(cfg.batch_size, len(x)), shuffle=True,
        drop_last=True, num_workers=1, persistent_workers=True,
        generator=torch.Generator().manual_seed(cfg.seed))
    with torch.random.fork_rng(devices=[]):   # seeded initial weights; the caller's RNG is left alone
        torch.manual_seed(cfg.seed)
        net = OracleNet(list(sizes), cfg.width).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.15)
    net.train()
    batches = iter(loader)
    bar = tqdm(range(cfg.steps), desc="training judge", unit="step", disable=not progress)
    for step in bar:
        try:
            batch, y = next(batches)
        except StopIteration:   # next epoch: a new shuffle, the same worker
            batches = iter(loader)
            batch, y = next(batches)
        _, logits = net(as_input(batch, size))
        loss = sum(F.cross_entropy(lg, y[:, l], label_smoothing=cfg.label_smoothing)
                   for l, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    del batches, loader   # stops the worker
    return net.eval()


def cache_root() -> Path:
    from ..backbone import cache_root as root
    return root() / "judge"


def _majority(train_labels: torch.Tensor, held_labels: torch.Tensor, ranks: Sequence[str]) -> dict[str, float]:
    """Held-out accuracy of always answering each rank's most frequent training label (chance level)."""
    return {r: float((held_labels[:, l] == train_labels[:, l].mode().values).float().mean())
            for l, r in enumerate(ranks)}


def load_or_train_judge(table: Table, taxonomy: Taxonomy, resolution: int, cfg: JudgeConfig = JudgeConfig(),
                        cache_dir: str | Path | None = None, progress: bool = True) -> Judge:
    """The judge of (`table`, `taxonomy`, `resolution`): loaded from `<cache_dir or cache_root()>/<key>/`,
    else trained on the split's training images and stored with its held-out accuracy per rank."""
    key = judge_key(table, taxonomy, resolution, cfg)
    path = (Path(cache_dir) if cache_dir is not None else cache_root()) / key
    sizes = [taxonomy.size(l) for l in range(taxonomy.num_levels)]
    with cache_lock(path):  # a second process waits here, then loads what the first stored
        cached = load_cached_net(path, "judge", sizes, cfg.width)
        if cached is not None:
            return Judge(cached[0], taxonomy, cached[1], path, trained=False)

        split = split_records(table, taxonomy, cfg.holdout, cfg.seed)
        x_tr, s_tr, bad_tr = load_split_images(split.train, table.preprocess, resolution, progress)
        x_ho, s_ho, bad_ho = load_split_images(split.held_out, table.preprocess, resolution, progress)
        y_tr = torch.tensor([taxonomy.ids(t) for t in s_tr]).reshape(len(s_tr), taxonomy.num_levels)
        y_ho = torch.tensor([taxonomy.ids(t) for t in s_ho]).reshape(len(s_ho), taxonomy.num_levels)
        t0, c0 = time.perf_counter(), time.process_time()
        net = train_judge(x_tr, y_tr, sizes, cfg, progress)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        info = {"key": key, "judge_version": JUDGE_VERSION, "resolution": int(resolution),
                "preprocess": table.preprocess, "data_root": table.root, "ranks": list(taxonomy.ranks),
                "sizes": sizes, "taxonomy_digest": taxonomy_digest(taxonomy), "train": asdict(cfg),
                "split": {**split.counts, "unreadable": len(bad_tr) + len(bad_ho),
                          "unreadable_paths": (bad_tr + bad_ho)[:20],
                          "held_out_species": len(set(s_ho))},
                "train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu, 1),
                "torch_threads": torch.get_num_threads()}
        judge = Judge(net, taxonomy, info, path, trained=True)
        info["train_accuracy"] = judge.accuracy(x_tr, s_tr)
        info["held_out_accuracy"] = judge.accuracy(x_ho, s_ho) if len(s_ho) else None
        info["held_out_majority_baseline"] = _majority(y_tr, y_ho, taxonomy.ranks) if len(s_ho) else None
        store_cached_net(path, "judge", net, info)
        return judge
