"""A run killed with SIGKILL mid-stage and resumed with --resume latest ends with the same weights
as an uninterrupted run of the same seed (issue 4)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tinyrun import tiny_overrides, write_images

pytestmark = pytest.mark.xdist_group("train")


def _cmd(overrides, *extra):
    return [sys.executable, "-m", "taxadiffusion.cli", "train", "--config", "tiny-cpu", *overrides, *extra]


def _final_weights(run: Path) -> dict:
    out = {}
    for f in sorted(run.glob("checkpoints/*/final/**/*.safetensors")):
        if f.name in ("optimizer.safetensors", "rng.safetensors", "ema.safetensors"):
            continue
        for k, v in load_file(f).items():
            out[f"{f.relative_to(run)}:{k}"] = v
    return out


def test_sigkill_then_resume_latest_matches_uninterrupted(tmp_path):
    data = write_images(tmp_path / "data")
    env = {**os.environ, "TAXADIFFUSION_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    long = ["train.steps_stage0=40", "train.checkpoint_every=5"]
    ref = tiny_overrides(data, tmp_path / "runs", "ref") + long
    subprocess.run(_cmd(ref), check=True, env=env, capture_output=True)

    killed = tiny_overrides(data, tmp_path / "runs", "killed") + long
    proc = subprocess.Popen(_cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = tmp_path / "runs" / "killed" / "checkpoints" / "stage-0-class" / "step-5" / "state.json"
    t0 = time.time()
    while not ckpt.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() - t0 < 300
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = tmp_path / "runs" / "killed"
    assert not (run / "checkpoints" / "stage-0-class" / "final").exists(), "the kill came too late"
    subprocess.run(_cmd(killed, "--resume", "latest"), check=True, env=env, capture_output=True)

    a, b = _final_weights(tmp_path / "runs" / "ref"), _final_weights(run)
    assert a.keys() == b.keys() and len(a) > 50
    names = {k.split(":")[0].split("/")[1] for k in a}
    assert names == {"stage-0-class", "stage-1-family", "stage-2-genus", "stage-3-species"}
    diff = [k for k in a if not (a[k] == b[k]).all()]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"
    log = (run / "log.txt").read_text()
    assert "resuming from" in log and "step 5" in log
