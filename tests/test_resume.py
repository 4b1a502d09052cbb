"""A run killed with SIGKILL mid-stage and resumed with --resume latest ends with the same weights
as an uninterrupted run of the same seed (issue 4)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
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


LONG = ["train.steps_stage0=40", "train.checkpoint_every=5"]


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory):
    """An uninterrupted run: 40 steps of stage 0, 3 of each later stage."""
    tmp_path = tmp_path_factory.mktemp("resume")
    data = write_images(tmp_path / "data")
    env = {**os.environ, "TAXADIFFUSION_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    subprocess.run(_cmd(tiny_overrides(data, tmp_path / "runs", "ref") + LONG), check=True, env=env,
                   capture_output=True)
    return tmp_path, data, env


def test_freeze_each_stage_changes_exactly_its_level(ref_run):
    """Stage k's final checkpoint differs from stage k-1's in level k's encoder only: the UNet,
    the text encoder and every other level are bitwise unchanged (paper Sec. 3.3)."""
    ckpts = sorted((ref_run[0] / "runs" / "ref" / "checkpoints").glob("stage-*/final"))
    assert len(ckpts) == 4

    def weights(d):
        return {f"{f.relative_to(d)}:{k}": v for f in sorted(d.glob("**/*.safetensors"))
                if f.name != "rng.safetensors" for k, v in load_file(f).items()}

    for k in range(1, 4):
        a, b = weights(ckpts[k - 1]), weights(ckpts[k])
        assert a.keys() == b.keys()
        changed = {n for n in a if not torch.equal(a[n], b[n])}
        level_k = {n for n in a if n.startswith("conditioner/") and f":levels.{k}." in n}
        assert changed == level_k, sorted(changed ^ level_k)[:5]


def test_sigkill_then_resume_latest_matches_uninterrupted(ref_run):
    tmp_path, data, env = ref_run
    long = LONG

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


def test_per_stage_extras_switch_off(tmp_path, monkeypatch):
    """train.fixed_batch=0 and train.validation_seeds=0 (benchmarks): no fixed-batch loss, no grids;
    the defaults log both for every stage."""
    import json
    from taxadiffusion.config import load_config
    from taxadiffusion.training import train
    monkeypatch.setenv("TAXADIFFUSION_CACHE", str(tmp_path / "cache"))
    data = write_images(tmp_path / "data")
    short = ["train.steps_stage0=2", "train.steps_per_stage=1", "train.checkpoint_every=0"]
    on = train(load_config("tiny-cpu", tiny_overrides(data, tmp_path / "runs", "with") + short
                           + ["train.fixed_batch=8"]))
    off = train(load_config("tiny-cpu", tiny_overrides(data, tmp_path / "runs", "without") + short
                            + ["train.fixed_batch=0", "train.validation_seeds=0"]))
    fixed = lambda run: [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                         if "fixed_loss" in r]
    assert len(fixed(on)) == 2 * 4 and len(list(on.glob("samples/*/*.png"))) == 4  # start + end, 4 stages
    assert fixed(off) == [] and not list(off.glob("samples/*/*.png"))
    assert {p.name for p in off.glob("checkpoints/*")} == {p.name for p in on.glob("checkpoints/*")}
    # every log record carries the level gains: zero-init levels are 0 until their stage moves them
    last = {r["stage"]: r["level_gains"] for r in map(json.loads, (on / "metrics.jsonl").read_text()
                                                      .splitlines()) if "level_gains" in r}
    gains = list(last.values())  # the last record of each stage, in stage order
    assert len(gains) == 4 and all(len(g) == 4 for g in gains)
    assert gains[0][0] > 0.5 and gains[0][1:] == [0, 0, 0]
    assert gains[1][1] > 0 and gains[1][2:] == [0, 0]  # one step of stage 1 moved level 1 only
    assert gains[3][3] > 0


def test_snr_gamma_weights_the_training_loss_not_the_fixed_batch_loss(tmp_path, monkeypatch):
    """train.snr_gamma (min-SNR weighting): the first step sees the same model, batch, noise and
    timesteps either way, so its weighted loss is lower (weights <= 1) while the fixed-batch loss,
    which compares runs, stays the plain MSE."""
    import json
    from taxadiffusion.config import load_config
    from taxadiffusion.training import train
    monkeypatch.setenv("TAXADIFFUSION_CACHE", str(tmp_path / "cache"))
    data = write_images(tmp_path / "data")
    short = ["train.steps_stage0=2", "train.steps_per_stage=1", "train.checkpoint_every=0",
             "train.fixed_batch=8", "train.validation_seeds=0"]
    runs = {g: train(load_config("tiny-cpu", tiny_overrides(data, tmp_path / "runs", f"g{g}") + short
                                 + [f"train.snr_gamma={g}"])) for g in ("null", 1)}
    recs = {g: [json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()]
            for g, r in runs.items()}
    first = {g: next(r for r in rs if "loss" in r and r["step"] == 1)["loss"] for g, rs in recs.items()}
    fixed0 = {g: next(r for r in rs if "fixed_loss" in r)["fixed_loss"] for g, rs in recs.items()}
    assert first[1] < first["null"]
    assert fixed0[1] == fixed0["null"]
