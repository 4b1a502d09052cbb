"""Memory of a process reading the input cache (latent_cache.py), and the cost of caching flips.

    python benchmarks/cache_memory.py [--records 10000 100000] [--reads 4000] [--vae SD_FOLDER --images DIR]

1. Synthetic caches of 10k and 100k records (latents of SD's shape at 64 px with margin and flips,
   4 x 9 x 9 x 2 views, so 100k fit a small disk), written in the fill's format. A fresh process
   opens each and reads the same number of random training windows (`LatentCache.batch`); its
   resident memory while reading (VmRSS, sampled per batch; ru_maxrss only shows the import's peak)
   should not grow with the records. For contrast, the old cache's way
   (safetensors.load_file of one tensor of every record) is measured too.
2. The arithmetic for iNat 2021 (2,686,843 training images) at 512 px.
3. --vae: flipping the latent itself (free) instead of caching the mirrored image's latent (2x disk),
   measured against the VAE's own reconstruction error on real images. Only meaningful on the real
   SD VAE: on a random VAE (the tests' stand-in) or without --vae the script says it cannot measure.
Writes benchmarks/results/cache_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from taxadiffusion.latent_cache import VERSION, _merge

INAT2021_TRAIN = 2_686_843


def synthetic_cache(d: Path, n: int, side: int = 9, views: int = 2, rows: int = 1024) -> Path:
    """A filled cache of n random records, in fill_cache's layout (one rank's index)."""
    d.mkdir(parents=True, exist_ok=True)
    fp = {"version": VERSION, "encoder": "synthetic", "resolution": 64, "margin": 8, "crop": "inat",
          "flip": views == 2, "unit": 8, "channels": 4, "dtype": "float16", "records": n, "data": "synthetic"}
    (d / "cache.json").write_text(json.dumps(fp))
    g = torch.Generator().manual_seed(0)
    with open(d / "index-r00000.jsonl", "w") as index:
        for k, i0 in enumerate(range(0, n, rows)):
            recs = list(range(i0, min(n, i0 + rows)))
            name = f"shard-r00000-{k:06d}.safetensors"
            x = torch.randn(len(recs), views, 4, side, side, generator=g).half()
            save_file({"x": x, "rec": torch.tensor(recs), "bad": torch.zeros(len(recs), dtype=torch.uint8)},
                      d / name)
            index.write(json.dumps({"shard": name, "rows": len(recs), "bytes": (d / name).stat().st_size,
                                    "sha256": "-", "records": recs, "bad": []}) + "\n")
    _merge(d, n, fp)
    return d


READER = """
import json, resource, sys, time
import numpy as np
from taxadiffusion.latent_cache import LatentCache

def rss():  # resident now, MB (ru_maxrss would show the import's peak, not the reading's)
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

d, reads, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
before, t, top = rss(), time.perf_counter(), 0.0
if mode == "cache":
    c = LatentCache(d)
    idx = np.random.default_rng(0).integers(0, len(c), reads)
    for i in range(0, reads, 32):
        c.batch(idx[i:i + 32].tolist(), epoch=1, seed=0)
        top = max(top, rss())
else:  # the old cache: one file, loaded whole on every rank
    from safetensors.torch import load_file
    x = load_file(d)["inputs"]
    idx = np.random.default_rng(0).integers(0, len(x), reads)
    for i in range(0, reads, 32):
        x[idx[i:i + 32]]
        top = max(top, rss())
print(json.dumps({"rss_before_open_mb": round(before, 1), "rss_peak_reading_mb": round(top, 1),
                  "growth_mb": round(top - before, 1), "read_s": round(time.perf_counter() - t, 2),
                  "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def measure(path: Path, reads: int, mode: str) -> dict:
    r = subprocess.run([sys.executable, "-c", READER, str(path), str(reads), mode], capture_output=True,
                       text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(r.stdout.strip().splitlines()[-1])


def inat_arithmetic() -> dict:
    gb = lambda per: INAT2021_TRAIN * per / 1e9
    plain, margin = 4 * 64 * 64 * 2, 4 * 72 * 72 * 2
    return {"images": INAT2021_TRAIN,
            "centre_crop_64x64_gb": round(gb(plain), 1),
            "margin_72x72_gb": round(gb(margin), 1),
            "margin_72x72_flips_gb": round(gb(2 * margin), 1),
            "old_cache_resident_per_rank_gb": round(gb(plain), 1),
            "index_resident_per_rank_mb": round(INAT2021_TRAIN * 9 / 1e6, 1),  # shard int32 + row int32 + bad
            "shards_of_1024_rows": -(-INAT2021_TRAIN // 1024),
            "bytes_per_record": {"64x64": plain, "72x72": margin, "72x72x2": 2 * margin}}


@torch.no_grad()
def flip_error(vae_dir: str | None, images: str | None, n: int = 32) -> dict:
    """Latent flip vs the mirrored image's latent, against the VAE's reconstruction error."""
    if not vae_dir:
        return {"measured": False, "why": "no --vae folder given: needs the real SD v1.5 VAE"}
    from diffusers import AutoencoderKL
    p = Path(vae_dir)
    vae = AutoencoderKL.from_pretrained(p / "vae" if (p / "vae").exists() else p, local_files_only=True)
    if tuple(vae.config.block_out_channels) != (128, 256, 512, 512):
        return {"measured": False, "why": f"{vae_dir} is not SD's VAE (block_out_channels "
                f"{list(vae.config.block_out_channels)}): a random or tiny VAE says nothing about this"}
    if not images:
        return {"measured": False, "why": "no --images folder of real photographs given"}
    from taxadiffusion.datasets.images import center, load_image, to_tensor
    files = sorted(f for f in Path(images).rglob("*") if f.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    vae = vae.to(dev).eval()
    rows = []
    for f in files:
        x = to_tensor(center(load_image(f), None, 512, None))[None].to(dev)
        z = vae.encode(x).latent_dist.mean
        zm = vae.encode(x.flip(-1)).latent_dist.mean
        rec = vae.decode(z).sample
        rec_flipz = vae.decode(z.flip(-1)).sample
        mse = lambda a, b: float(((a.clamp(-1, 1) - b) ** 2).mean())
        rows.append({"latent_rel_l2": float((z.flip(-1) - zm).norm() / zm.norm()),
                     "recon_mse": mse(rec, x), "flipped_latent_decode_mse": mse(rec_flipz, x.flip(-1)),
                     "mirror_latent_decode_mse": mse(vae.decode(zm).sample, x.flip(-1))})
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    return {"measured": True, "images": len(rows), "resolution": 512, **mean,
            "reading": "flipping the latent costs (flipped_latent_decode_mse - recon_mse) beyond the "
                       "VAE's own error; small next to recon_mse means latent flips are good enough"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--reads", type=int, default=4000)
    ap.add_argument("--vae", default=None, help="SD v1.5 folder (or its vae/ folder)")
    ap.add_argument("--images", default=None, help="real images for --vae")
    ap.add_argument("--out", default="benchmarks/results/cache_memory.json")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.records:
            t = time.perf_counter()
            d = synthetic_cache(Path(tmp) / f"c{n}", n)
            size = sum(f.stat().st_size for f in d.glob("shard-*")) / 1e6
            row = {"records": n, "shape": [2, 4, 9, 9], "cache_mb": round(size, 1),
                   "write_s": round(time.perf_counter() - t, 1), "cache": measure(d, a.reads, "cache")}
            old = Path(tmp) / f"old{n}.safetensors"   # the old layout: every record in one tensor
            save_file({"inputs": torch.ones(n, 8, 9, 9, dtype=torch.float16)}, old)  # same bytes
            row["old_load_whole"] = measure(old, a.reads, "old")
            rows.append(row)
            print(json.dumps(row))
            for f in d.iterdir():
                f.unlink()
            old.unlink()
    peaks = [r["cache"]["rss_peak_reading_mb"] for r in rows]
    growth = [r["cache"]["growth_mb"] for r in rows]
    out = {"rows": rows, "reads_per_process": a.reads,
           "peak_ratio_largest_vs_smallest": round(peaks[-1] / peaks[0], 3),
           "growth_mb_smallest_largest": [growth[0], growth[-1]],
           "inat2021": inat_arithmetic(), "flip_latent_vs_mirror": flip_error(a.vae, a.images),
           "python": sys.version.split()[0], "torch": torch.__version__}
    print(json.dumps({k: out[k] for k in ("peak_ratio_largest_vs_smallest", "growth_mb_smallest_largest", "inat2021", "flip_latent_vs_mirror")},
                     indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
