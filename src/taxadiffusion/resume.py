"""Resuming a run: where to start, and what must not have changed since the checkpoint.

`--resume latest` continues from the newest checkpoint of the run folder, `--resume FOLDER` from that
checkpoint. Before any weight is loaded the checkpoint is compared with the run as configured now:
a changed model, seed, learning rate, batch size, strategy or dataset would continue training weights
that the new config does not describe, so such a resume is refused with the changed fields named,
unless the user says to continue anyway (`resume_anyway`). Fields that only change logging,
checkpoint cadence or where things are written may change freely; step counts may grow or shrink
(a longer run continues a shorter one). The dataset is compared by content (records and lineages),
not by path, so a moved data folder resumes.

One training process at a time per run folder: `run_lock` holds an OS lock (released by the OS if
the process dies) while a run trains, and a second process gets an error naming the folder.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from .checkpoint import STATE_FILE, list_checkpoints
from .config import config_from_file

# config fields a resumed run may change (section.key; "section.*" for a whole section)
RESUME_MAY_CHANGE = (
    "name", "train.stages", "train.output_dir", "train.log_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.validate_every", "train.validation_seeds", "train.report_to",
    "train.steps_per_stage", "train.steps_stage0", "data.num_workers", "data.root", "data.metadata",
    "data.cache_dir",
    "sample.*", "eval.*",
)


def data_fingerprint(table, taxonomy) -> str:
    """sha256 of what the run trains on: each record's path below the image root, lineage and box,
    in order, the crop policy, and the taxonomy's ranks and prompts' form (a moved folder keeps its fingerprint)."""
    h = hashlib.sha256(json.dumps([list(taxonomy.ranks), taxonomy.species_prompt,
                                   table.preprocess]).encode())
    root = str(table.root) if getattr(table, "root", None) else ""
    for r in table.records:
        path = os.path.relpath(r.path, root) if root else str(r.path)
        h.update(f"{path}|{'/'.join(r.lineage)}|{r.box}\n".encode())
    return h.hexdigest()[:20]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_changes(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every field that differs and may not change on resume."""
    a, b = _flat(old), _flat(new)
    free = {k for k in RESUME_MAY_CHANGE if not k.endswith(".*")}
    sections = tuple(k[:-1] for k in RESUME_MAY_CHANGE if k.endswith(".*"))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in free and not k.startswith(sections)]


def read_state(ckpt: Path) -> dict:
    f = Path(ckpt) / STATE_FILE
    if not f.exists():
        raise FileNotFoundError(f"{ckpt} is not a checkpoint: {STATE_FILE} is missing")
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f} is damaged ({e}); resume from an earlier checkpoint with "
                         f"--resume <its folder>") from e


def find_resume_point(run: Path, resume: str) -> tuple[Path | None, dict | None]:
    """(checkpoint folder, its state) to continue from; (None, None) for `latest` in a run that has
    no checkpoint yet (a fresh start)."""
    if resume == "latest":
        found = list_checkpoints(run)
        if not found:
            return None, None
        ckpt = found[-1][2]
    else:
        ckpt = Path(resume)
    return ckpt, read_state(ckpt)


def check_resumable(ckpt: Path, state: dict, cfg_dict: dict, data_fp: str, num_stages: int,
                    anyway: bool, log) -> None:
    """Refuse a resume whose checkpoint does not belong to this configuration and data."""
    k = state.get("stage_index")
    if not isinstance(k, int) or not 0 <= k < num_stages:
        raise ValueError(f"{ckpt / STATE_FILE}: stage_index {k!r} is not a stage of this plan "
                         f"(0..{num_stages - 1})")
    cfile = Path(ckpt) / "config.json"
    if not cfile.exists():
        raise FileNotFoundError(f"{cfile} is missing; resume from an earlier checkpoint with "
                                f"--resume <its folder>")
    # through the dataclasses, so a field added since the checkpoint was written compares as its
    # default rather than as a change (config_from_file names the file if it is damaged)
    old = config_from_file(cfile).to_dict()
    problems = config_changes(old, cfg_dict)
    if state.get("data_fingerprint") not in (None, data_fp):
        problems.append(f"data: records or lineages differ (fingerprint {state['data_fingerprint']} "
                        f"-> {data_fp})")
    if not problems:
        return
    msg = f"{ckpt} was trained with another configuration: " + "; ".join(problems)
    if not anyway:
        raise ValueError(msg + ". Start a new run (another name), or pass --resume-anyway to "
                               "continue these weights under the new settings")
    log(f"warning: {msg}; continuing anyway (--resume-anyway)")


def prune_metrics(run: Path, stage_order: dict[str, int], stage_index: int, step: int) -> int:
    """Drop metrics.jsonl records logged after (stage_index, step) by the run that stopped: the
    resumed run logs them again, so each (stage, step) stays once. Returns how many were dropped."""
    f = Path(run) / "metrics.jsonl"
    if not f.exists():
        return 0
    keep, dropped = [], 0
    for line in f.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        pos = (stage_order.get(rec.get("stage"), -1), rec.get("step", 0))
        if pos > (stage_index, step):
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        tmp = f.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        tmp.replace(f)
    return dropped


class RunInUseError(ValueError):
    """The run folder is held by another training process."""


@contextlib.contextmanager
def run_lock(run: Path, enabled: bool = True) -> Iterator[None]:
    """Hold `run/train.lock` while training; a second process training into `run` gets an error."""
    if not enabled:
        yield
        return
    from filelock import FileLock, Timeout
    Path(run).mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(Path(run) / "train.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunInUseError(f"another process is training in {run} (it holds {run}/train.lock); "
                           f"wait for it to finish, or train under another name") from None
    try:
        yield
    finally:
        lock.release()
