"""Faults around a run (issue 23): a resume that does not fit the checkpoint, missing or damaged
state files, impossible stage indices, two trainings in one folder, metrics after a resume, a
changed image under the input cache, a full disk."""
import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

from tinyrun import tiny_overrides, write_images

pytestmark = pytest.mark.xdist_group("train")
SHORT = ["train.steps_stage0=6", "train.steps_per_stage=1", "train.checkpoint_every=3",
         "train.fixed_batch=8", "train.validation_seeds=0"]


def _train(data: Path, out: Path, name: str, *extra: str, resume=None, anyway=False) -> Path:
    from taxadiffusion.config import load_config
    from taxadiffusion.training import train
    return train(load_config("tiny-cpu", tiny_overrides(data, out, name) + SHORT + list(extra)),
                 resume=resume, resume_anyway=anyway)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished tiny run; tests copy it and damage the copy."""
    tmp = tmp_path_factory.mktemp("faults")
    mp = pytest.MonkeyPatch()
    mp.setenv("TAXADIFFUSION_CACHE", str(tmp / "cache"))
    data = write_images(tmp / "data")
    run = _train(data, tmp / "runs", "ref")
    yield tmp, data, run
    mp.undo()


def _half_done(done, tmp_path) -> tuple[Path, Path]:
    """A copy of the finished run cut back to its stage-0 step-3 checkpoint, as if killed there
    (metrics.jsonl keeps what the stopped run had logged after it)."""
    tmp, data, run = done
    out = tmp_path / "runs"
    cut = out / "ref"
    shutil.copytree(run, cut)
    for d in cut.glob("checkpoints/*/*"):
        if not (d.parent.name == "stage-0-class" and d.name == "step-3"):
            shutil.rmtree(d)
    return data, out


def test_resume_with_another_seed_is_refused_naming_the_field(done, tmp_path):
    data, out = _half_done(done, tmp_path)
    before = (out / "ref" / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"train\.seed: 42 -> 7.*--resume-anyway"):
        _train(data, out, "ref", "train.seed=7", resume="latest")
    assert (out / "ref" / "config.yaml").read_text() == before  # nothing rewritten
    with pytest.raises(ValueError, match=r"model\.text_width: 32 -> 16"):
        _train(data, out, "ref", "model.text_width=16", "model.level_heads=4", resume="latest")
    # told to continue anyway: it does, and says so in the log
    _train(data, out, "ref", "train.seed=7", resume="latest", anyway=True)
    assert "continuing anyway" in (out / "ref" / "log.txt").read_text()


def test_resume_on_other_data_is_refused(done, tmp_path):
    data, out = _half_done(done, tmp_path)
    rows = (data / "metadata.csv").read_text().splitlines()
    other = tmp_path / "other"
    shutil.copytree(data, other)
    (other / "metadata.csv").write_text("\n".join(rows[:-3]) + "\n")   # three rows fewer
    with pytest.raises(ValueError, match="data: records or lineages differ"):
        _train(other, out, "ref", resume="latest")
    moved = tmp_path / "moved"        # the same data in another folder resumes
    shutil.copytree(data, moved)
    _train(moved, out, "ref", resume="latest")


def test_metrics_hold_each_stage_step_once_after_resume(done, tmp_path):
    data, out = _half_done(done, tmp_path)
    run = _train(data, out, "ref", resume="latest")
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["stage"], r["step"], "fixed_loss" in r) for r in recs]
    assert len(keys) == len(set(keys)), [k for k in keys if keys.count(k) > 1][:5]
    ref = [json.loads(l) for l in (done[2] / "metrics.jsonl").read_text().splitlines()]
    assert sorted(keys) == sorted((r["stage"], r["step"], "fixed_loss" in r) for r in ref)


@pytest.mark.parametrize("damage", ["optimizer-missing", "optimizer-truncated", "rng-missing",
                                    "state-garbled", "stage-impossible", "ema-missing"])
def test_damaged_state_files_are_named(done, tmp_path, damage):
    data, out = _half_done(done, tmp_path)
    ck = out / "ref" / "checkpoints" / "stage-0-class" / "step-3"
    target = {"optimizer-missing": "optimizer.safetensors", "optimizer-truncated": "optimizer.safetensors",
              "rng-missing": "rng.safetensors", "state-garbled": "state.json",
              "stage-impossible": "state.json", "ema-missing": "ema.safetensors"}[damage]
    f = ck / target
    if damage.endswith("missing"):
        f.unlink()
    elif damage == "optimizer-truncated":
        f.write_bytes(f.read_bytes()[:200])
    elif damage == "state-garbled":
        f.write_text(f.read_text()[:-10])
    else:
        st = json.loads(f.read_text())
        st["stage_index"] = 99
        f.write_text(json.dumps(st))
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        _train(data, out, "ref", resume="latest")
    msg = str(e.value)
    assert target in msg, msg
    assert ("99" in msg) if damage == "stage-impossible" else ("--resume" in msg), msg


def test_two_trainings_in_one_folder(done, tmp_path):
    from filelock import FileLock
    from taxadiffusion.resume import RunInUseError
    data = done[1]
    run = tmp_path / "runs" / "busy"
    run.mkdir(parents=True)
    with FileLock(str(run / "train.lock")):   # another process training there
        with pytest.raises(RunInUseError, match="another process is training in .*busy"):
            _train(data, tmp_path / "runs", "busy")
    assert not (run / "config.yaml").exists()
    _train(data, tmp_path / "runs", "busy", "train.steps_stage0=1", "train.steps_per_stage=0")


def test_replaced_image_is_read_again(done, tmp_path, monkeypatch):
    """The input cache is keyed by each file's size and mtime: an image replaced under the same
    path makes another cache (it used to train on the old pixels); tests/test_latent_cache.py
    checks that a cache folder of other inputs is rebuilt or refused."""
    import numpy as np
    from PIL import Image
    monkeypatch.setenv("TAXADIFFUSION_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    shutil.copytree(done[1], data)
    args = ["train.steps_stage0=1", "train.steps_per_stage=0", "train.checkpoint_every=0"]
    digest = lambda name: json.loads((tmp_path / "runs" / name / "latents" / "cache.json").read_text())["data"]
    _train(data, tmp_path / "runs", "a", *args)
    img = data / "img" / "corax_0.png"
    Image.fromarray(np.full((20, 20, 3), 255, np.uint8)).save(img)
    _train(data, tmp_path / "runs", "b", *args)
    assert digest("a") != digest("b")


def test_full_disk_names_the_folder_and_keeps_earlier_checkpoints(done, tmp_path, monkeypatch):
    from taxadiffusion import checkpoint
    data, out = _half_done(done, tmp_path)
    ck = out / "ref" / "checkpoints" / "stage-0-class" / "step-3"
    before = sorted(p.name for p in ck.iterdir())

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(OSError, match=r"could not write checkpoint .*stage-0-class.*earlier checkpoints are intact"):
        _train(data, out, "ref", resume="latest")
    assert sorted(p.name for p in ck.iterdir()) == before
    assert not list(ck.parent.glob("*.tmp"))


def test_cli_passes_resume_anyway(monkeypatch, tmp_path):
    from taxadiffusion import cli, training
    seen = {}
    monkeypatch.setattr(training, "train", lambda cfg, **kw: seen.update(kw) or tmp_path)
    cli.main(["train", "--config", "tiny-cpu", "--resume", "latest", "--resume-anyway",
              f"data.root={tmp_path}"])
    assert seen == {"resume": "latest", "resume_anyway": True}
    cli.main(["train", "--config", "tiny-cpu", f"data.root={tmp_path}"])
    assert seen == {"resume": None, "resume_anyway": False}


def test_feature_cache_ids_change_with_the_file(tmp_path):
    """FID's real-image feature cache is keyed by path, size and mtime: a replaced image is
    measured again (it used to be keyed by path alone)."""
    import os
    from taxadiffusion.evaluation.fid import file_ids
    f = tmp_path / "a.png"
    f.write_bytes(b"x" * 10)
    before = file_ids([str(f)])
    f.write_bytes(b"y" * 12)
    os.utime(f, ns=(1, 2))
    after = file_ids([str(f)])
    assert before != after and after[0].startswith(str(f))
    assert file_ids([str(tmp_path / "gone.png")]) == [f"{tmp_path / 'gone.png'}|missing"]


@pytest.mark.parametrize("damage", ["truncated", "reshaped", "key-removed"])
def test_damaged_weights_are_named_when_loaded(done, tmp_path, damage):
    """A truncated, reshaped or edited safetensors file in a run: an error naming the file (it
    used to be a raw SafetensorError, a size-mismatch traceback or `error: conv_in.bias`)."""
    from safetensors.torch import load_file, save_file
    from taxadiffusion.pipeline import TaxaDiffusionPipeline
    run = tmp_path / "ref"
    shutil.copytree(done[2], run)
    f = run / "checkpoints" / "stage-3-species" / "final" / "unet" / "diffusion_pytorch_model.safetensors"
    if damage == "truncated":
        f.write_bytes(f.read_bytes()[:1000])
    else:
        sd = load_file(f)
        if damage == "reshaped":
            sd["conv_in.bias"] = torch.zeros(3)
        else:
            del sd["conv_in.bias"]
        save_file(sd, f)
    from taxadiffusion.checkpoint import load_model_state
    from taxadiffusion.backbone import build_tiny
    from taxadiffusion.config import config_from_file
    cfg = config_from_file(run / "config.yaml")
    unet = build_tiny(cfg.model, cfg.data.resolution).unet
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors"):
        load_model_state(f.parent.parent, unet, None)


def test_training_log_names_the_unreadable_image(done, tmp_path, monkeypatch):
    """A damaged image under the input cache is flagged by its own record and named in the log
    (the log used to name the record that replaced it)."""
    monkeypatch.setenv("TAXADIFFUSION_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    shutil.copytree(done[1], data)
    (data / "img" / "pica_2.png").write_bytes(b"not a png at all")
    run = _train(data, tmp_path / "runs", "bad", "train.steps_stage0=1", "train.steps_per_stage=0",
                 "train.checkpoint_every=0")
    line = next(l for l in (run / "log.txt").read_text().splitlines() if "unreadable" in l)
    assert "pica_2.png" in line and "1 unreadable" in line, line


def test_checkpoint_config_without_newer_fields_resumes(done, tmp_path):
    """A checkpoint written before a config field existed compares that field as its default: the
    resume goes on (it would be refused as a change otherwise)."""
    data, out = _half_done(done, tmp_path)
    f = out / "ref" / "checkpoints" / "stage-0-class" / "step-3" / "config.json"
    cfg = json.loads(f.read_text())
    del cfg["data"]["cache_flip"], cfg["train"]["report_to"]
    f.write_text(json.dumps(cfg))
    _train(data, out, "ref", resume="latest")
    assert (out / "ref" / "checkpoints" / "stage-3-species" / "final").exists()
