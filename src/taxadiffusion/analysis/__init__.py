"""What a trained model learned per rank (issue 8): trait grids, per-level attention maps, embedding maps.

- traits.py      the same seeds at every level of a lineage, and sibling species side by side
- attention.py   each level's share of the cross-attention output over the image (paper Fig. S6)
- embeddings.py  t-SNE of learned level embeddings vs the frozen text encoder's (paper Fig. S2)

This file stays import-light (no torch): the CLI imports it to place outputs. Every command writes
under RUN/analysis/<kind>/ and adds a section to the run's report; a saved pipeline that does not sit
inside a run folder writes to --out (default ./analysis) and has no report.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

DEFAULT_OUT = Path("analysis")


def find_run_folder(path: str | Path, max_up: int = 4) -> Path | None:
    """The training run folder (config.yaml + checkpoints/) that `path` is or sits in, else None.

    A run folder is itself; a checkpoint folder runs/x/checkpoints/stage-k-rank/final is three levels
    down; a pipeline saved as runs/x/pipeline one level down.
    """
    p = Path(path).resolve()
    for d in [p, *p.parents][: max_up + 1]:
        if (d / "config.yaml").is_file() and (d / "checkpoints").is_dir():
            return d
    return None


def output_folder(run: str | Path, kind: str, out: str | Path | None) -> tuple[Path, Path | None]:
    """(folder for this kind of analysis, run folder or None). --out wins when given."""
    run_dir = find_run_folder(run)
    if out is not None:
        return Path(out) / kind, run_dir
    if run_dir is None:
        return DEFAULT_OUT / kind, None
    return run_dir / "analysis" / kind, run_dir


def publish(run_dir: Path | None, key: str, title: str, blocks: Sequence[dict], order: int) -> Path | None:
    """Add (or replace) a report section and rebuild report.html; nothing without a run folder."""
    if run_dir is None:
        return None
    from ..report import add_section, build_report
    add_section(run_dir, key, title, blocks, order=order)
    return build_report(run_dir)


def sample_settings(a, sc) -> dict:
    """Pipeline keyword arguments from CLI options (`a`) over the run's SampleConfig (`sc`)."""
    return dict(guidance=a.guidance or sc.guidance,
                guidance_scale=sc.scale if a.scale is None else a.scale,
                guide_level=sc.guide_level if getattr(a, "guide_level", None) is None else a.guide_level,
                num_inference_steps=a.steps or sc.steps)
