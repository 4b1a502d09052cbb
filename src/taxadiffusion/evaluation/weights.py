"""Where each metric's weights come from, what identifies them, and the provenance every number carries.

Weights are never downloaded at run time (DESIGN.md, "Weights"). `find_weights` returns the first
existing candidate file, or raises `MissingWeightsError` naming the file, every place looked and how to
obtain it. `file_identity` hashes a weights file (sha256), so a result or a feature cache can say
exactly which network produced it. `provenance` is the block attached to every reported number.
"""
from __future__ import annotations

import hashlib
import os
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import taxadiffusion


class MissingWeightsError(FileNotFoundError):
    """A metric's weights are absent. The message names the file, where it was looked for, how to get it."""


def torch_hub_checkpoints() -> Path:
    """torch hub's checkpoint folder: $TORCH_HOME/hub/checkpoints (TORCH_HOME defaults to
    $XDG_CACHE_HOME/torch, i.e. ~/.cache/torch). `load_state_dict_from_url` caches files here, so a
    machine that ever ran torch-fidelity or torchvision with internet has them here."""
    import torch.hub  # local import: keep `import taxadiffusion.evaluation.weights` light

    return Path(torch.hub.get_dir()) / "checkpoints"


def find_weights(what: str, candidates: Sequence[tuple[Path, str]], how_to_get: str) -> Path:
    """The first existing file among `candidates` ((path, why this place) pairs), else a helpful error.

    `what` names the weights ("FID Inception-v3 weights weights-inception-2015-12-05-6726825d.pth").
    A candidate that exists but is a directory is not accepted (it is listed as looked-at).
    """
    for path, _ in candidates:
        if Path(path).is_file():
            return Path(path)
    looked = "\n".join(f"  - {p}  ({why})" for p, why in candidates)
    raise MissingWeightsError(
        f"{what} not found. Nothing is downloaded at run time.\nLooked in:\n{looked}\n"
        f"How to get it: {how_to_get}")


_IDENTITY_CACHE: dict[tuple[str, int, int], dict] = {}


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """{"file", "path", "bytes", "sha256"} of a weights file; memoised on (path, size, mtime) because
    hashing a 600 MB checkpoint costs seconds and every metric call asks for it."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _IDENTITY_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _IDENTITY_CACHE[key] = {"file": p.name, "path": str(p), "bytes": st.st_size,
                                "sha256": h.hexdigest()}
    return dict(_IDENTITY_CACHE[key])


def library_version(dist: str) -> str:
    """Installed version of a distribution (importlib.metadata), e.g. "torch-fidelity" -> "0.4.0"."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError as e:
        raise ModuleNotFoundError(f"{dist} is not installed; it is needed to compute this metric") from e


def provenance(
    metric: str,
    library: str,
    weights: Mapping[str, Any],
    settings: Mapping[str, Any],
    resolution: int | str | None,
    definition: str,
) -> dict[str, Any]:
    """The block every reported number carries: how it was obtained, by which code and weights.

    `library` is the distribution that computed it (its installed version is recorded with torch's);
    `weights` the identity of each network used (see `file_identity`); `settings` every knob that
    changes the number (pairs, seeds, subset sizes, balancing); `resolution` the input size the
    network saw; `definition` one or two sentences a reader can reproduce the number from.
    """
    return {
        "metric": metric,
        "library": library,
        "library_version": library_version(library),
        "torch_version": library_version("torch"),
        "taxadiffusion_version": taxadiffusion.__version__,
        "weights": dict(weights),
        "resolution": resolution,
        "settings": dict(settings),
        "definition": definition,
    }
