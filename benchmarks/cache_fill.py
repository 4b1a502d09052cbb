"""Input-cache fill throughput (latent_cache.fill_cache) with 1 and 2 processes on the CPU (gloo).

    python benchmarks/cache_fill.py [--images 192] [--resolution 64] [--flip]

The tests' SD stand-in VAE (8x downsampling, random weights, tiny widths) encodes generated 96 px
images at resolution + margin (72 px for 64); each process encodes its share (global rank) and
writes its own shards, the main process merges. Per configuration: wall time of the fill as rank 0
sees it (barriers included), images/s, then a second fill of the same folder (nothing to encode:
only the checks of what is there, sizes and sha256). Spawned through torch.distributed.run like
`accelerate launch`. On a shared 2-core machine 2 processes can at best halve the time. Writes
benchmarks/results/cache_fill.json.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(a) -> None:
    import torch
    import torch.distributed as dist
    sys.path.insert(0, str(ROOT / "tests"))
    from tinyrun import LINEAGES  # noqa: F401  (the tests' helpers)
    from taxadiffusion.datasets import read_table
    from taxadiffusion.latent_cache import fill_cache, vae_encoder
    torch.set_num_threads(1)
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if multi:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if multi else (0, 1)
    barrier = dist.barrier if multi else (lambda: None)
    from test_latent_cache import _vae
    table = read_table("csv", str(Path(a.data) / "metadata.csv"), a.data)
    enc = vae_encoder(_vae(), "cpu")
    out = {}
    for name in ("fill", "refill"):
        barrier()
        t = time.perf_counter()
        c = fill_cache(a.cache, table.records, enc, preprocess="inat", resolution=a.resolution, flip=a.flip,
                       rank=rank, world=world, barrier=barrier, batch_size=16, progress=False,
                       log=lambda m: None)
        out[name] = {"wall_s": time.perf_counter() - t, "encoded_by_rank0": c.stats["encoded"]}
    if rank == 0:
        print("RESULT " + json.dumps(out))
    if multi:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--flip", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/cache_fill.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    sys.path.insert(0, str(ROOT / "tests"))
    from tinyrun import LINEAGES, write_images
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_images(Path(tmp) / "data", per_species=-(-a.images // len(LINEAGES)), size=96)
        n = sum(1 for _ in (data / "img").iterdir())
        for procs in (1, 2):
            cache = Path(tmp) / f"cache{procs}"
            args = [__file__, "--worker", "--data", str(data), "--cache", str(cache),
                    "--resolution", str(a.resolution)] + (["--flip"] if a.flip else [])
            launch = [sys.executable] if procs == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                "--master_port", str(_free_port())]
            r = subprocess.run(launch + args, env=env, capture_output=True, text=True)
            if r.returncode:
                sys.exit(r.stderr[-3000:])
            res = json.loads(next(l for l in r.stdout.splitlines() if l.startswith("RESULT "))[7:])
            size = sum(f.stat().st_size for f in cache.glob("shard-*")) / 1e6
            row = {"processes": procs, "images": n, "fill_wall_s": round(res["fill"]["wall_s"], 2),
                   "images_per_s": round(n / res["fill"]["wall_s"], 1),
                   "encoded_by_rank0": res["fill"]["encoded_by_rank0"],
                   "refill_wall_s": round(res["refill"]["wall_s"], 3),
                   "refill_encoded": res["refill"]["encoded_by_rank0"], "cache_mb": round(size, 2)}
            rows.append(row)
            print(json.dumps(row))
    out = {"rows": rows, "resolution": a.resolution, "encoded_px": a.resolution + 8 * -(-a.resolution // 64),
           "flip": a.flip, "encoder": "tests' SD stand-in VAE (random, tiny widths)",
           "speedup_2_vs_1": round(rows[1]["images_per_s"] / rows[0]["images_per_s"], 2),
           "cpus": os.cpu_count(), "note": "CPU, gloo; the machine's 2 cores were shared with other work"}
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}))


if __name__ == "__main__":
    main()
