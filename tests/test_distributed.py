"""Two CPU processes (gloo) through torchrun: identical weights, disjoint halves of the data."""
import json
import os
import socket
import subprocess
import sys

import pytest

from tinyrun import tiny_overrides, write_images

pytestmark = pytest.mark.xdist_group("train")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_share_weights_and_split_the_data(tmp_path):
    data = write_images(tmp_path / "data")
    env = {**os.environ, "TAXADIFFUSION_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "-m", "taxadiffusion.cli", "train", "--config", "tiny-cpu",
           *tiny_overrides(data, tmp_path / "runs", "ddp"), "train.steps_stage0=6", "train.checkpoint_every=0"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = tmp_path / "runs" / "ddp" / "ranks"
    for stage in ("stage-0-class", "stage-3-species"):
        r0 = json.loads((ranks / f"{stage}-rank0.json").read_text())
        r1 = json.loads((ranks / f"{stage}-rank1.json").read_text())
        assert r0["weights_sha256"] == r1["weights_sha256"]           # DDP kept them in step
        assert r0["served"] == r1["served"] > 0
    # stage 3: 3 steps x 4 per rank x 2 ranks = 24 = one epoch: the ranks saw different halves
    r0 = json.loads((ranks / "stage-3-species-rank0.json").read_text())["head"]
    r1 = json.loads((ranks / "stage-3-species-rank1.json").read_text())["head"]
    assert len(r0) == len(r1) == 12 and sorted(r0 + r1) == list(range(24))
    # stage 0: 6 steps x 4 per rank x 2 ranks = 48 = two epochs of 24 images: each rank saw 24
    # distinct positions per epoch and together they covered every image
    r0 = json.loads((ranks / "stage-0-class-rank0.json").read_text())["head"]
    r1 = json.loads((ranks / "stage-0-class-rank1.json").read_text())["head"]
    assert sorted(r0[:12] + r1[:12]) == list(range(24))
