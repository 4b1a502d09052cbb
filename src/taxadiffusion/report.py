"""The run report: runs/<name>/report.html, assembled from sections any command can add.

A section is a small JSON file under runs/<name>/report/ (`add_section`): a title, an order key and
a list of blocks; `build_report` renders every section into one self-contained HTML page (images
are linked by relative path, so the page works when the run folder is copied). Blocks:
  {"text": "..."}                                 a paragraph (plain text)
  {"image": "relative/path.png", "caption": "..."}
  {"table": {"columns": [...], "rows": [[...], ...]}, "caption": "..."}
  {"pre": "..."}                                  preformatted text (settings, commands)
Loss curves per stage are drawn from metrics.jsonl (`loss_curves`).
"""
from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Sequence

SECTIONS = "report"


def add_section(run: str | Path, key: str, title: str, blocks: Sequence[dict], order: int = 50) -> Path:
    """Write (or replace) section `key` of the run's report."""
    d = Path(run) / SECTIONS
    d.mkdir(parents=True, exist_ok=True)
    f = d / f"{key}.json"
    f.write_text(json.dumps({"key": key, "title": title, "order": order, "blocks": list(blocks)},
                            indent=1))
    return f


def rel(run: str | Path, path: str | Path) -> str:
    """`path` relative to the run folder, for image blocks."""
    return os.path.relpath(Path(path).resolve(), Path(run).resolve())


def loss_curves(run: str | Path) -> Path | None:
    """One panel per stage: training loss (smoothed by the logging window) and fixed-batch loss."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    run = Path(run)
    f = run / "metrics.jsonl"
    if not f.exists():
        return None
    recs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    stages = list(dict.fromkeys(r["stage"] for r in recs))
    if not stages:
        return None
    fig, axes = plt.subplots(1, len(stages), figsize=(3.2 * len(stages), 2.8), squeeze=False)
    for ax, st in zip(axes[0], stages):
        tr = [(r["step"], r["loss"]) for r in recs if r["stage"] == st and "loss" in r]
        fx = [(r["step"], r["fixed_loss"]) for r in recs if r["stage"] == st and "fixed_loss" in r]
        if tr:
            ax.plot(*zip(*tr), lw=1, label="train (window mean)")
        if fx:
            ax.plot(*zip(*fx), "o-", ms=3, label="fixed batch")
        ax.set_title(st, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("MSE", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    out = run / SECTIONS / "loss_curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _block(b: dict) -> str:
    if "text" in b:
        return f"<p>{html.escape(b['text'])}</p>"
    if "pre" in b:
        return f"<pre>{html.escape(b['pre'])}</pre>"
    cap = f"<figcaption>{html.escape(b['caption'])}</figcaption>" if b.get("caption") else ""
    if "image" in b:
        src = html.escape(b["image"])
        return f'<figure><a href="{src}"><img src="{src}" alt="{src}"></a>{cap}</figure>'
    if "table" in b:
        t = b["table"]
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in t["columns"])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
                       for row in t["rows"])
        return f"<figure><table><tr>{head}</tr>{body}</table>{cap}</figure>"
    raise ValueError(f"unknown report block {sorted(b)}")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
img{max-width:100%;image-rendering:pixelated;border:1px solid #eee}figure{margin:1em 0}
figcaption{font-size:.85em;color:#555}table{border-collapse:collapse;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}pre{background:#f7f7f7;padding:.6em;overflow-x:auto}
nav a{margin-right:1em}"""


def build_report(run: str | Path, title: str | None = None) -> Path:
    """Render every section of the run into report.html (sorted by order, then key)."""
    run = Path(run)
    curves = loss_curves(run)
    if curves is not None:
        add_section(run, "loss", "Loss curves per stage", [
            {"image": rel(run, curves), "caption": "Training loss (mean over each logging window) and "
             "the loss on a fixed batch with fixed noise and timesteps, comparable across steps."}],
            order=20)
    secs = [json.loads(f.read_text()) for f in sorted((run / SECTIONS).glob("*.json"))]
    secs.sort(key=lambda s: (s["order"], s["key"]))
    nav = " ".join(f'<a href="#{html.escape(s["key"])}">{html.escape(s["title"])}</a>' for s in secs)
    body = "\n".join(f'<h2 id="{html.escape(s["key"])}">{html.escape(s["title"])}</h2>\n'
                     + "\n".join(_block(b) for b in s["blocks"]) for s in secs)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title or run.name)}"
            f"</title><style>{STYLE}</style></head><body><h1>{html.escape(title or run.name)}</h1>"
            f"<nav>{nav}</nav>\n{body}\n</body></html>")
    out = run / "report.html"
    out.write_text(page)
    return out
