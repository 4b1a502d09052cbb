"""FID and KID by taxonomic level, on torch-fidelity's FID Inception-v3 (paper Sec. 4.2, Table 1).

Features: torch-fidelity's `FeatureExtractorInceptionV3` ("inception-v3-compat"), 2048-d pool features.
We use torch-fidelity rather than torchmetrics' wrapper of the same network because torchmetrics
resizes with antialiasing by default, while torch-fidelity reproduces the original TensorFlow FID
resize (bilinear, TF1 semantics) - numbers comparable with published FIDs. The maths is torch-fidelity's
(`fid_features_to_statistics`, `fid_statistics_to_metric`, `kid_features_to_metric`), never ours.

Weights: a path given by the user, else torch hub's cache file
`$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth` (the file torch-fidelity
downloads from `URL_INCEPTION_V3`); never downloaded here. Real-set features are cached per image on
disk (safetensors + JSON), keyed by dataset id, split, resolution and the weights' sha256, so every
grouping (per level, per class, per few-shot bucket) reuses them.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file
from threadpoolctl import threadpool_limits  # scikit-learn's dependency
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from tqdm.auto import tqdm

from ..taxonomy import Taxon
from .tables import taxon_seed
from .weights import file_identity, find_weights, library_version, provenance, torch_hub_checkpoints

INCEPTION_FILE = URL_INCEPTION_V3.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth
FEATURE_DIMS = {"64": 64, "192": 192, "768": 768, "2048": 2048}  # torch-fidelity's pool features
BALANCES = ("match", "all")


@dataclass
class Inception:
    """A loaded FID Inception: the torch-fidelity module, its identity (weights file + sha256), device."""

    net: FeatureExtractorInceptionV3
    identity: dict[str, Any]
    feature: str
    device: torch.device

    @property
    def dims(self) -> int:
        return FEATURE_DIMS[self.feature]


def inception_weights_path(weights: str | os.PathLike | None = None) -> Path:
    """The Inception weights file: `weights` if given, else torch hub's cache; else MissingWeightsError."""
    cached = torch_hub_checkpoints() / INCEPTION_FILE
    candidates = ([(Path(weights), "given with --fid-weights")] if weights else [])
    candidates.append((cached, "torch hub cache: $TORCH_HOME/hub/checkpoints, TORCH_HOME defaults to "
                               "~/.cache/torch; where torch-fidelity saves it"))
    return find_weights(
        f"FID Inception-v3 weights {INCEPTION_FILE}", candidates,
        f"on a machine with internet run `wget {URL_INCEPTION_V3}` (or any torch-fidelity FID once) "
        f"and copy the file to {cached}, or pass its path: `--fid-weights /path/{INCEPTION_FILE}` "
        f"(taxadiffusion evaluate; in Python: load_inception(weights=...)).")


def inception_identity(weights: str | os.PathLike | None = None, feature: str = "2048") -> dict[str, Any]:
    """What identifies the feature extractor (weights file, sha256, layer), without building the network."""
    ident = file_identity(inception_weights_path(weights))
    return {"network": "torch-fidelity inception-v3-compat", "feature": feature, **ident}


_LOADED: dict[tuple, Inception] = {}


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_inception(weights: str | os.PathLike | None = None, feature: str = "2048",
                   device: str | torch.device | None = None) -> Inception:
    """Build torch-fidelity's FID Inception with local weights (memoised per file, layer and device)."""
    if feature not in FEATURE_DIMS:
        raise ValueError(f"feature must be one of {sorted(FEATURE_DIMS)}, got {feature!r}")
    ident = inception_identity(weights, feature)
    dev = _device(device)
    key = (ident["path"], ident["sha256"], feature, str(dev))
    if key not in _LOADED:
        # torch-fidelity loads with weights_only=False (it unpickles anything); checking the file with
        # weights_only=True first means a tampered checkpoint is refused before it is unpickled.
        try:
            torch.load(ident["path"], map_location="cpu", weights_only=True)
            net = FeatureExtractorInceptionV3("inception-v3-compat", [feature],
                                              feature_extractor_weights_path=ident["path"])
        except Exception as e:
            raise ValueError(f"{ident['path']}: not a valid FID Inception state dict "
                             f"(expected torch-fidelity's {INCEPTION_FILE}): {e}") from e
        _LOADED[key] = Inception(net.to(dev), ident, feature, dev)
    return _LOADED[key]


def _check_images(images: torch.Tensor, what: str = "images") -> None:
    if not (torch.is_tensor(images) and images.dtype == torch.uint8 and images.dim() == 4
            and images.shape[1] == 3):
        got = (f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__)
        raise ValueError(f"{what}: expected a uint8 tensor (N, 3, H, W) as read from PNGs, got {got}")


def inception_features(
    images: torch.Tensor,
    weights: str | os.PathLike | Inception | None = None,
    batch_size: int = 50,
    *,
    feature: str = "2048",
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> torch.Tensor:
    """Inception pool features (N, 2048) of uint8 images (N, 3, H, W); any H, W (resized to 299 inside).

    `weights`: a path, None (torch hub cache) or an already loaded `Inception` (then its own layer is
    used, not `feature`). `progress`: None shows a tqdm bar when there are more than 4 batches.
    """
    _check_images(images)
    ext = weights if isinstance(weights, Inception) else load_inception(weights, feature, device)
    n_batches = math.ceil(len(images) / batch_size)
    out = []
    with torch.inference_mode():
        for i in tqdm(range(0, len(images), batch_size), total=n_batches, unit="batch",
                      desc="Inception features", disable=not (progress if progress is not None
                                                              else n_batches > 4)):
            (f,) = ext.net(images[i:i + batch_size].to(ext.device))
            out.append(f.float().cpu())
    return torch.cat(out) if out else torch.empty(0, ext.dims)


# -- per-image reference-feature cache -----------------------------------------------------------
def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(s)).strip("_") or "x"


def file_ids(paths: Sequence[str]) -> list[str]:
    """Cache ids of image files, "path|size|mtime_ns": a file replaced or truncated under the same
    path gets a new id, so its features are computed again instead of read stale from the cache."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append(f"{p}|{st.st_size}|{st.st_mtime_ns}")
        except OSError:
            out.append(f"{p}|missing")
    return out


def reference_features(
    ids: Sequence[str],
    read: Callable[[Sequence[str]], torch.Tensor],
    *,
    cache_dir: str | os.PathLike,
    dataset_id: str,
    split: str,
    resolution: int,
    weights: str | os.PathLike | Inception | None = None,
    batch_size: int = 50,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> torch.Tensor:
    """Features (len(ids), D) of real images, in the order of `ids`, computed once and cached on disk.

    `read(batch_ids)` returns those images as uint8 (B, 3, resolution, resolution); it is called only
    for ids not yet in the cache. Cache: `<cache_dir>/<dataset>-<split>-<res>px-inception-<sha12>-
    <feature>.safetensors` (tensor "features") with a `.json` sidecar holding the key and the row ids.
    """
    ext = weights if isinstance(weights, Inception) else load_inception(weights, device=device)
    key = {"dataset_id": str(dataset_id), "split": str(split), "resolution": int(resolution),
           "extractor_sha256": ext.identity["sha256"], "feature": ext.feature}
    stem = (f"{_slug(dataset_id)}-{_slug(split)}-{int(resolution)}px-inception-"
            f"{ext.identity['sha256'][:12]}-{ext.feature}")
    cache_dir = Path(cache_dir)
    st_path, js_path = cache_dir / f"{stem}.safetensors", cache_dir / f"{stem}.json"
    row: dict[str, int] = {}
    feats = torch.empty(0, ext.dims)
    if js_path.exists():
        meta = json.loads(js_path.read_text())
        if meta.get("key") != key:
            raise ValueError(f"{js_path}: cache key {meta.get('key')} does not match {key}; delete the "
                             f"file and its .safetensors to rebuild")
        feats = load_file(st_path)["features"] if st_path.exists() else feats
        if len(feats) != len(meta["ids"]):
            raise ValueError(f"{st_path}: {len(feats)} feature rows but {js_path} lists "
                             f"{len(meta['ids'])} ids; delete both files to rebuild")
        row = {i: k for k, i in enumerate(meta["ids"])}
    missing = [i for i in dict.fromkeys(map(str, ids)) if i not in row]
    if missing:
        new = []
        show = progress if progress is not None else len(missing) > 4 * batch_size
        for s in tqdm(range(0, len(missing), batch_size), unit="batch", disable=not show,
                      desc=f"reference features {dataset_id}/{split}"):
            batch = missing[s:s + batch_size]
            imgs = read(batch)
            _check_images(imgs, f"read({batch[0]!r}...)")
            if imgs.shape[0] != len(batch) or tuple(imgs.shape[2:]) != (resolution, resolution):
                raise ValueError(f"read() returned {tuple(imgs.shape)} for {len(batch)} ids starting at "
                                 f"{batch[0]!r}; expected ({len(batch)}, 3, {resolution}, {resolution})")
            new.append(inception_features(imgs, ext, batch_size, progress=False))
        feats = torch.cat([feats, *new]).contiguous()
        for i in missing:
            row[i] = len(row)
        cache_dir.mkdir(parents=True, exist_ok=True)
        meta = {"key": key, "ids": list(row), "extractor": ext.identity,
                "torch_fidelity_version": library_version("torch-fidelity")}
        # write both files under temporary names, then rename: a killed run never leaves a half cache
        save_file({"features": feats}, str(st_path) + ".tmp")
        Path(str(js_path) + ".tmp").write_text(json.dumps(meta))
        os.replace(str(st_path) + ".tmp", st_path)
        os.replace(str(js_path) + ".tmp", js_path)
    return feats[torch.tensor([row[str(i)] for i in ids], dtype=torch.long)]


def features_by_taxon(features: torch.Tensor, taxa: Sequence[Taxon]) -> dict[Taxon, torch.Tensor]:
    """Split per-image rows into {taxon: its rows}, e.g. cached reference features by species."""
    if len(features) != len(taxa):
        raise ValueError(f"{len(features)} feature rows but {len(taxa)} taxa")
    idx: dict[Taxon, list[int]] = {}
    for k, t in enumerate(taxa):
        idx.setdefault(t, []).append(k)
    return {t: features[torch.tensor(ks)] for t, ks in idx.items()}


# -- FID / KID ------------------------------------------------------------------------------------
def fid_kid(gen: torch.Tensor, real: torch.Tensor, *, kid_subset_size: int = 1000,
            kid_subsets: int = 100, seed: int = 2020) -> dict[str, Any]:
    """FID and KID of two feature sets, with the sample counts and how KID was subsampled.

    FID needs two samples a side (a covariance) and is biased upward, with a rank-deficient covariance,
    when a set has no more samples than feature dims: `fid_small_n` flags that. KID's subset size is
    min(kid_subset_size, n_gen, n_real) (torch-fidelity requires subset <= N); when that is every
    sample of both sets all subsets are identical, so one subset is drawn (std 0).
    """
    gen, real = gen.detach().cpu().double(), real.detach().cpu().double()
    n1, n2, d = len(gen), len(real), gen.shape[1]
    out: dict[str, Any] = {"n_gen": n1, "n_real": n2, "dims": d, "fid": None, "fid_small_n": min(n1, n2) <= d,
                           "kid_mean": None, "kid_std": None, "kid_subset_size": None, "kid_subsets": None}
    if min(n1, n2) >= 2:
        # FID's 2048x2048 eigendecomposition (LAPACK geev) gains little from BLAS threads, and on a
        # busy machine OpenBLAS' spinning threads made it 10x slower (measured 50 s vs 6 s): one thread.
        with threadpool_limits(1, user_api="blas"):
            out["fid"] = fid_statistics_to_metric(fid_features_to_statistics(gen),
                                                  fid_features_to_statistics(real),
                                                  verbose=False)["frechet_inception_distance"]
        m = min(kid_subset_size, n1, n2)
        subsets = kid_subsets if (m < n1 or m < n2) else 1
        kid = kid_features_to_metric(gen, real, kid_subsets=subsets, kid_subset_size=m,
                                     rng_seed=seed, verbose=False)
        out.update(kid_mean=kid["kernel_inception_distance_mean"],
                   kid_std=kid["kernel_inception_distance_std"], kid_subset_size=m, kid_subsets=subsets)
    else:
        out["note"] = "fewer than 2 samples on a side: FID/KID undefined"
    return out


def _subset(x: torch.Tensor, m: int, seed: int) -> torch.Tensor:
    if m >= len(x):
        return x
    g = torch.Generator().manual_seed(seed)
    return x[torch.randperm(len(x), generator=g)[:m].sort().values]


def _to_features(d: Mapping[Taxon, torch.Tensor], side: str, ext_args: dict) -> tuple[dict, list[str]]:
    """Images -> features in one batched pass; features pass through. Returns (features, image sizes)."""
    imgs = {t: v for t, v in d.items() if v.dtype == torch.uint8}
    out = {t: v for t, v in d.items() if v.dtype != torch.uint8}
    for t, v in out.items():
        if v.dim() != 2:
            raise ValueError(f"{side}[{t}]: expected uint8 images (N,3,H,W) or features (N,D), "
                             f"got {v.dtype} {tuple(v.shape)}")
    sizes = sorted({f"{v.shape[2]}x{v.shape[3]}" for v in imgs.values() if v.dim() == 4})
    if imgs:
        for t, v in imgs.items():
            _check_images(v, f"{side}[{t}]")
        feats = inception_features(torch.cat(list(imgs.values())), **ext_args)
        for t, f in zip(imgs, feats.split([len(v) for v in imgs.values()])):
            out[t] = f
    return out, sizes


def _level_of(spec: int | str, gen: Mapping[Taxon, Any]) -> int:
    if isinstance(spec, int):
        return spec
    hits = {t.level for t in gen if t.rank == spec}
    if len(hits) != 1:
        raise ValueError(f"no generated taxa at rank {spec!r}; ranks present: "
                         f"{sorted({t.rank for t in gen})}")
    return hits.pop()


def fid_by_level(
    gen: Mapping[Taxon, torch.Tensor],
    real: Mapping[Taxon, torch.Tensor],
    levels: Sequence[int | str] | None = None,
    *,
    weights: str | os.PathLike | Inception | None = None,
    feature_source: Mapping[str, Any] | None = None,
    balance: str = "match",
    per_taxon_min: int | None = 10,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    seed: int = 0,
    batch_size: int = 50,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """FID and KID per taxonomic level (and per taxon), with counts, skips and provenance.

    `gen`: {taxon the images were conditioned on: uint8 images (N,3,H,W) or features (N,D)};
    `real`: {taxon (usually species): its real images or features}. At level L the generated images of
    every level-L taxon t are pooled, and so are the real images of every `real` key under t (path
    prefix). `balance="match"` takes min(n_gen(t), n_real(t)) images of t from each side (seeded
    random subset), so both pools have the same taxon mix and FID measures images, not class balance;
    `"all"` pools every image. Taxa without real (or generated) images are skipped and listed. Per
    taxon: FID/KID on all of t's images when both sides have >= `per_taxon_min` (None: off).
    Features passed in must come with `feature_source` (their extractor's identity, e.g.
    `inception_identity()`), so the result can say what produced them.
    """
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
    ext_args = {"weights": weights, "batch_size": batch_size, "device": device}
    values = [*gen.values(), *real.values()]
    needs_net = any(v.dtype == torch.uint8 for v in values)
    has_features = any(v.dtype != torch.uint8 for v in values)
    if needs_net and not isinstance(weights, Inception):
        ext_args["weights"] = load_inception(weights, device=device)
    if has_features and feature_source is None:
        raise ValueError("features were passed without feature_source: pass the extractor identity "
                         "(e.g. fid.inception_identity(weights)) so the numbers say what produced them")
    if has_features and needs_net and feature_source.get("sha256") != ext_args["weights"].identity["sha256"]:
        raise ValueError(f"features passed in come from {feature_source} but the images would go "
                         f"through {ext_args['weights'].identity['path']}: one extractor per comparison")
    gen_f, gen_sizes = _to_features(gen, "gen", ext_args)
    real_f, real_sizes = _to_features(real, "real", ext_args)
    under: dict[tuple[str, ...], list[Taxon]] = {}
    for s in real_f:
        for lvl in range(s.level + 1):
            under.setdefault(s.path[:lvl + 1], []).append(s)

    wanted = [_level_of(x, gen) for x in levels] if levels is not None else sorted({t.level for t in gen})
    result_levels: dict[str, Any] = {}
    per_taxon: dict[Taxon, Any] = {}
    skipped: list[dict[str, Any]] = []
    for lvl in wanted:
        taxa = sorted(t for t in gen_f if t.level == lvl)
        if not taxa:
            raise ValueError(f"no generated taxa at level {lvl}; levels present: "
                             f"{sorted({t.level for t in gen_f})}")
        pool_g, pool_r, used = [], [], 0
        for t in taxa:
            g_all = gen_f[t]
            r_all = (torch.cat([real_f[s] for s in under[t.path]]) if t.path in under
                     else torch.empty(0, g_all.shape[1]))
            if len(g_all) == 0 or len(r_all) == 0:
                skipped.append({"taxon": t, "level": lvl, "n_gen": len(g_all), "n_real": len(r_all),
                                "reason": "no generated images" if len(g_all) == 0
                                else "no real images under this taxon"})
                continue
            used += 1
            g, r = g_all, r_all
            if balance == "match":
                m = min(len(g), len(r))
                g, r = _subset(g, m, taxon_seed(seed, t)), _subset(r, m, taxon_seed(seed + 1, t))
            pool_g.append(g)
            pool_r.append(r)
            if per_taxon_min is None:
                continue
            if min(len(g_all), len(r_all)) >= per_taxon_min:
                per_taxon[t] = fid_kid(g_all, r_all, kid_subset_size=kid_subset_size,
                                       kid_subsets=kid_subsets)
            else:
                per_taxon[t] = {"n_gen": len(g_all), "n_real": len(r_all), "fid": None, "kid_mean": None,
                                "note": f"fewer than per_taxon_min={per_taxon_min} samples on a side"}
        name = taxa[0].rank or f"level {lvl}"
        if not pool_g:
            result_levels[name] = {"level": lvl, "rank": taxa[0].rank, "n_taxa": 0, "fid": None,
                                   "note": "every taxon at this level was skipped"}
            continue
        result_levels[name] = {"level": lvl, "rank": taxa[0].rank, "n_taxa": used,
                               **fid_kid(torch.cat(pool_g), torch.cat(pool_r),
                                         kid_subset_size=kid_subset_size, kid_subsets=kid_subsets)}

    source = dict(ext_args["weights"].identity if needs_net else feature_source)
    settings = {"balance": balance, "per_taxon_min": per_taxon_min, "seed": seed,
                "kid_subset_size_max": kid_subset_size, "kid_subsets": kid_subsets,
                "kid_kernel": "poly degree 3, gamma 1/d, coef0 1", "kid_rng_seed": 2020,
                "generated_image_sizes": gen_sizes, "real_image_sizes": real_sizes}
    definition = (
        "FID and KID between torch-fidelity FID Inception-v3 pool features of generated and real images "
        "(uint8 images resized to 299x299 inside the network, TF1-compatible bilinear). At level L the "
        "generated images of every level-L taxon are pooled and compared with the pooled real images "
        "of the same taxa (every real image whose lineage passes through the taxon). balance='match': "
        "min(n_gen, n_real) images per taxon from each side, seeded random subset, so both pools have "
        "the same taxon mix; 'all': every image. Taxa lacking real or generated images are skipped and "
        "listed. Per taxon: all of the taxon's images, when both sides have >= per_taxon_min. FID: "
        "torch_fidelity.metric_fid; KID: torch_fidelity.metric_kid (unbiased MMD^2, polynomial kernel; "
        "subset size min(requested, n_gen, n_real)). fid_small_n: FID on no more samples than feature "
        "dims (rank-deficient covariance, biased upward): prefer KID there.")
    return {"kind": "fid_by_level",
            "provenance": provenance("fid_kid", "torch-fidelity", {"inception": source}, settings,
                                     "299 (Inception input; resized inside the network)", definition),
            "levels": result_levels, "per_taxon": per_taxon, "skipped": skipped}
