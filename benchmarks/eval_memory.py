"""Peak memory of evaluate's generate-and-measure loop at 1x and 4x the taxa (issue 22).

    python benchmarks/eval_memory.py [--taxa 8] [--n 16] [--size 256]

Each case runs in a fresh process: a stub pipeline (random uint8 images, no model: the sampling cost
is not what is measured) feeds `samples.generate`, which writes PNGs; then a metric-shaped pass reads
the images back one taxon at a time (stream.GeneratedImages), as every metric of `evaluate` does.
"held" is the former design for contrast: the same images all kept in one dict. Measured: the peak
resident set (ru_maxrss) above the resident set after the imports. Streamed, it should not grow with
the taxa; held, it grows by the images' bytes. Writes benchmarks/results/eval_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(taxa: int, n: int, size: int, mode: str) -> dict:
    import torch

    import taxadiffusion.pipeline  # noqa: F401  (generate imports it: loaded before the baseline)
    from taxadiffusion.evaluation.samples import generate
    from taxadiffusion.taxonomy import NONE_NAME, Taxonomy
    tax = Taxonomy(["class", "genus", "species"], [("Aves", f"G{i % 4}", f"s{i}") for i in range(taxa)])
    species = [t for t in tax.vocab(2) if t.name != NONE_NAME]

    def pipe(t, num_images, generator, **kw):
        return SimpleNamespace(images=torch.stack([torch.randint(0, 256, (3, size, size), generator=g,
                                                                 dtype=torch.uint8) for g in generator]))
    settings = {"seed": 0, "guidance": "taxa", "guidance_scale": 3.0, "guide_level": 0,
                "num_inference_steps": 1, "batch_size": 8}
    base = _rss_mb()
    with tempfile.TemporaryDirectory() as d:
        gen = generate(pipe, species, n, Path(d), settings, size=size, progress=False)
        if mode == "held":
            kept = {t: gen[t] for t in gen}   # what evaluate held before: every image at once
            checksum = sum(float(v.float().mean()) for v in kept.values())
        else:
            checksum = sum(float(gen[t].float().mean()) for t in gen)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"taxa": taxa, "images": taxa * n, "mode": mode, "image_mb": taxa * n * 3 * size * size / 2**20,
            "rss_after_imports_mb": round(base, 1), "peak_rss_mb": round(peak, 1),
            "growth_mb": round(peak - base, 1), "checksum": round(checksum, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--taxa", type=int, default=8)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/eval_memory.json")
    ap.add_argument("--child", choices=("streamed", "held"))
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.taxa, a.n, a.size, a.child)))
        return
    rows = []
    for mode in ("streamed", "held"):
        for k in (a.taxa, 4 * a.taxa):
            r = subprocess.run([sys.executable, __file__, "--child", mode, "--taxa", str(k), "--n", str(a.n),
                                "--size", str(a.size)], check=True, capture_output=True, text=True)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(rows[-1])
    by = {(r["mode"], r["taxa"]): r["growth_mb"] for r in rows}
    doc = {"benchmark": "eval_memory", "n_per_taxon": a.n, "size": a.size, "rows": rows,
           "growth_4x_minus_1x_mb": {m: round(by[(m, 4 * a.taxa)] - by[(m, a.taxa)], 1)
                                     for m in ("streamed", "held")},
           "note": "peak RSS above the post-import RSS, fresh process per row; stub pipeline"}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc["growth_4x_minus_1x_mb"]))


if __name__ == "__main__":
    main()
