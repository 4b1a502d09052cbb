"""The input cache (latent_cache.py): windows and mirrored views are what they say, a killed fill
resumes with only the missing records, damaged shards and other inputs are named, and two processes
fill the same cache as one."""
import json
import os
import socket
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from taxadiffusion.datasets.images import PREPROCESS, load_image, to_tensor
from taxadiffusion.latent_cache import (CacheError, LatentCache, default_margin, fill_cache,
                                        pixel_encoder, vae_encoder)

HERE = Path(__file__).resolve().parent


@lru_cache(maxsize=2)
def _vae(seed: int = 0):
    """tests/sdstub.py's VAE (8x downsampling, 4 channels, SD's scaling factor), built alone: the
    whole stand-in takes seconds more for its CLIP parts."""
    from diffusers import AutoencoderKL
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
            block_out_channels=(8, 16, 16, 16), norm_num_groups=8, sample_size=64,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=0.18215).eval()


class Counting:
    """An encoder that counts the images it was given (and can fail after `fail_after` calls)."""

    def __init__(self, enc, fail_after: int | None = None):
        self.enc, self.images, self.calls, self.fail_after = enc, 0, 0, fail_after

    def __call__(self):
        def fn(x):
            if self.fail_after is not None and self.calls >= self.fail_after:
                raise KeyboardInterrupt("killed")
            self.calls += 1
            self.images += len(x)
            return self.enc.fn(x)
        return type(self.enc)(fn, self.enc.name, self.enc.unit, self.enc.channels)


def _records(root: Path, n: int = 10, w: int = 80, h: int = 64) -> list:
    """Non-square images with structure (so mirrors and windows differ)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        a = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        a[:, : w // 3] = (40 * (i % 6), 200, 30)
        p = root / f"im{i}.png"
        Image.fromarray(a).save(p)
        out.append(SimpleNamespace(path=str(p), box=None, lineage=("Aves", f"sp{i % 3}")))
    return out


def _expected(rec, size, enc, mirror=False):
    img = PREPROCESS["inat"](load_image(rec.path), rec.box, size, None)
    if mirror:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    with torch.no_grad():
        return enc.fn(to_tensor(img)[None])[0].to(torch.float16)


KW = dict(preprocess="inat", resolution=64, progress=False, log=lambda m: None)


def test_margin_defaults():
    assert default_margin("inat", 512) == 64 and default_margin("fishnet", 64) == 8
    assert default_margin("bioscan", 512) == 0 and default_margin("center", 512) == 0


def test_window_is_the_slice_of_the_encoded_image_and_mirror_is_encoded(tmp_path):
    recs = _records(tmp_path / "img", 4)
    enc = vae_encoder(_vae(), "cpu")
    c = fill_cache(tmp_path / "c", recs, enc, margin=16, flip=True, shard_rows=3, **KW)
    assert (len(c), c.side, c.slack, c.views) == (4, 8, 2, 2)
    seen = set()
    for i, r in enumerate(recs):
        full = c.read(i)
        assert full.shape == (4, 10, 10)
        # the image at 64 + 16 px, and its mirror's latent (encoded alone here, in batches there:
        # CPU convolutions round by batch size)
        assert torch.allclose(full, _expected(r, 80, enc), atol=2e-3, rtol=0)
        assert torch.allclose(c.read(i, 1), _expected(r, 80, enc, mirror=True), atol=2e-3, rtol=0)
        assert (c.read(i, 1) - c.read(i, 0).flip(-1)).abs().max() > 0.01
        for epoch in range(6):
            v, t, l = c.window(i, epoch, seed=3)
            seen.add((v, t, l))
            want = c.read(i, v)[:, t:t + 8, l:l + 8]
            assert torch.equal(c.crop(i, v, t, l), want)
            assert torch.equal(c.batch([i], epoch, 3)[0], want)
            assert c.window(i, epoch, 3) == (v, t, l)                  # deterministic
    assert len(seen) > 6 and {v for v, _, _ in seen} == {0, 1}


def test_exact_presets_and_pixels(tmp_path):
    """margin 0 (BIOSCAN padding, centre crops): one window, the evaluation image itself; without a
    VAE the cache holds pixels."""
    recs = _records(tmp_path / "img", 3)
    c = fill_cache(tmp_path / "c", recs, pixel_encoder(), **{**KW, "preprocess": "bioscan"})
    assert (c.slack, c.views) == (0, 1)
    img = PREPROCESS["bioscan"](load_image(recs[1].path), None, 64, None)
    assert torch.equal(c.batch([1], 5, 0)[0], to_tensor(img).half())


def test_killed_fill_resumes_with_the_missing_records_only(tmp_path):
    recs = _records(tmp_path / "img", 10)
    enc = vae_encoder(_vae(), "cpu")
    first = Counting(enc, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        fill_cache(tmp_path / "c", recs, first(), batch_size=2, shard_rows=2, **KW)
    assert first.images == 4 and len(list((tmp_path / "c").glob("shard-*.safetensors"))) == 2
    with open(tmp_path / "c" / "index-r00000.jsonl", "a") as f:
        f.write('{"shard": "shard-r00000-000002.safet')      # a line cut by the kill
    again = Counting(enc)
    c = fill_cache(tmp_path / "c", recs, again(), batch_size=2, shard_rows=2, **KW)
    assert again.images == 6 and c.stats["encoded"] == 6 and c.stats["present"] == 4
    ref = fill_cache(tmp_path / "ref", recs, enc, **KW)
    for i in range(10):
        assert torch.equal(c.read(i), ref.read(i))
    third = Counting(enc)
    fill_cache(tmp_path / "c", recs, third(), **KW)
    assert third.images == 0


def test_damaged_and_missing_shards_are_named(tmp_path):
    recs = _records(tmp_path / "img", 6)
    enc = pixel_encoder()
    d = tmp_path / "c"
    fill_cache(d, recs, enc, shard_rows=2, **KW)
    shards = sorted(d.glob("shard-*.safetensors"))
    assert len(shards) == 3
    a, b, c = shards
    data = bytearray(a.read_bytes())
    data[-5] ^= 0xFF                                      # same size, other bytes
    a.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=rf"shard {a.name} is altered"):
        fill_cache(d, recs, enc, **KW)
    c.unlink()
    with pytest.raises(CacheError, match=rf"shard {c.name} is missing"):
        LatentCache(d)                                   # the reader checks sizes
    b.write_bytes(b.read_bytes()[:-100])
    with pytest.raises(CacheError, match=rf"shard {b.name} is truncated"):
        LatentCache(d)
    # the error's advice works: dropping a shard's index line re-encodes just its records
    index = d / "index-r00000.jsonl"
    lines = [l for l in index.read_text().splitlines() if json.loads(l)["shard"] not in (a.name, b.name, c.name)]
    index.write_text("".join(l + "\n" for l in lines))
    counting = Counting(enc)
    fill_cache(d, recs, counting(), **KW)
    assert counting.images == 6


def test_other_inputs_are_rebuilt_or_refused(tmp_path):
    recs = _records(tmp_path / "img", 4)
    d = tmp_path / "c"
    fill_cache(d, recs, vae_encoder(_vae(), "cpu"), **KW)
    with pytest.raises(CacheError, match=r"resolution: 64 -> 32"):
        fill_cache(d, recs, vae_encoder(_vae(), "cpu"), **{**KW, "resolution": 32}, on_mismatch="error")
    with pytest.raises(CacheError, match=r"encoder: \w+ -> \w+"):
        fill_cache(d, recs, vae_encoder(_vae(1), "cpu"), **KW, on_mismatch="error")
    with pytest.raises(CacheError, match=r"flip: False -> True"):
        fill_cache(d, recs, vae_encoder(_vae(), "cpu"), **KW, flip=True, on_mismatch="error")
    os.utime(recs[2].path, ns=(0, 0))                          # an image replaced under the same path
    with pytest.raises(CacheError, match=r"data: \w+ -> \w+"):
        fill_cache(d, recs, vae_encoder(_vae(), "cpu"), **KW, on_mismatch="error")
    logs = []
    counting = Counting(vae_encoder(_vae(1), "cpu"))
    c = fill_cache(d, recs, counting(), **{**KW, "log": logs.append, "resolution": 32})
    assert counting.images == 4 and "rebuilding" in logs[0] and c.read(0).shape == (4, 5, 5)
    assert len(list(d.glob("shard-*"))) == 1


def test_stream_batches_replay_on_resume(tmp_path):
    """The training loop's cached batches: a stream restarted at step k yields what the
    uninterrupted stream yielded from k (windows depend on (seed, epoch, record) only)."""
    from taxadiffusion.data_stream import StreamSampler
    from taxadiffusion.training import _batches
    recs = _records(tmp_path / "img", 6)
    c = fill_cache(tmp_path / "c", recs, pixel_encoder(), flip=True, **{**KW, "resolution": 16})
    has, ids = torch.arange(6), torch.zeros(6, 2, dtype=torch.long)
    full = _batches(StreamSampler(6, 4, 0, 1, seed=1), has, c, None, ids, 0, seed=5)
    xs = [next(full)[0] for _ in range(7)]
    resumed = _batches(StreamSampler(6, 4, 0, 1, seed=1, start=4), has, c, None, ids, 0, seed=5)
    for k in range(4, 7):
        assert torch.equal(next(resumed)[0], xs[k])
    assert xs[0].shape == (4, 3, 16, 16)


WORKER = """
import os, sys, json
sys.path.insert(0, {tests!r})
import torch.distributed as dist
from types import SimpleNamespace
from test_latent_cache import _vae, KW
from taxadiffusion.latent_cache import fill_cache, vae_encoder
dist.init_process_group("gloo")
recs = [SimpleNamespace(**r) for r in json.loads({recs!r})]
c = fill_cache({out!r}, recs, vae_encoder(_vae(), "cpu"), flip=True, shard_rows=2, batch_size=2,
               rank=dist.get_rank(), world=dist.get_world_size(), barrier=dist.barrier, **KW)
print(json.dumps(c.stats))
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_fill_the_cache_one_process_fills(tmp_path):
    recs = _records(tmp_path / "img", 10)
    # the same batch size as the workers: CPU convolutions round by batch size
    one = fill_cache(tmp_path / "one", recs, vae_encoder(_vae(), "cpu"), flip=True, batch_size=2, **KW)
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(HERE), out=str(tmp_path / "two"),
                                    recs=json.dumps([vars(r) for r in recs])))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(_free_port()), str(script)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = sorted(json.loads(l)["encoded"] for l in r.stdout.splitlines() if l.startswith("{"))
    assert stats == [5, 5]                                     # each rank encoded its half
    assert {p.name for p in (tmp_path / "two").glob("index-r*.jsonl")} == {"index-r00000.jsonl",
                                                                          "index-r00001.jsonl"}
    two = LatentCache(tmp_path / "two")
    assert json.loads((tmp_path / "two" / "cache.json").read_text()) == one.fp
    for i in range(10):
        for v in (0, 1):
            assert torch.equal(two.read(i, v), one.read(i, v)), (i, v)
