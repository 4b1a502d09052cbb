"""`evaluate` on a tiny trained run (issue 19): it adds a report section (tables, a sample grid per
level, the settings) and rebuilds report.html; a missing metric weights file fails before any image is
generated, naming the file and the option of the running command; `--pretrained` reaches the loader."""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from taxadiffusion.config import load_config
from taxadiffusion.evaluation import judge as judge_mod
from taxadiffusion.evaluation.judge import JudgeConfig
from taxadiffusion.evaluation.run import evaluate
from taxadiffusion.evaluation.weights import MissingWeightsError

from tinyrun import tiny_overrides, write_images

pytestmark = [pytest.mark.xdist_group("train"), pytest.mark.usefixtures("one_thread")]

FAST_JUDGE = JudgeConfig(steps=8, batch_size=8, width=4)   # the default recipe trains for minutes
QUICK = dict(levels=["family", "species"], n_per_taxon=2, steps=2, device="cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(data folder, run folder, cache folder) of a tiny pixel-space run trained through every stage."""
    from taxadiffusion.training import train
    tmp = tmp_path_factory.mktemp("evalrun")
    data = write_images(tmp / "data")
    cache = tmp / "cache"
    with pytest.MonkeyPatch.context() as m:
        m.setenv("TAXADIFFUSION_CACHE", str(cache))
        # evaluate reads the final checkpoints only: the fewest steps, no validation grids (10 s)
        run = train(load_config("tiny-cpu", tiny_overrides(data, tmp / "runs", "t") + [
            "train.steps_stage0=2", "train.steps_per_stage=1", "train.checkpoint_every=100",
            "train.validation_seeds=0"]))
    return data, Path(run), cache


@pytest.fixture
def fast_judge(tiny, monkeypatch):
    monkeypatch.setenv("TAXADIFFUSION_CACHE", str(tiny[2]))
    monkeypatch.setattr(judge_mod, "load_or_train_judge",
                        functools.partial(judge_mod.load_or_train_judge, cfg=FAST_JUDGE, progress=False))


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png")) if folder.exists() else []


def test_evaluate_adds_its_tables_and_samples_to_the_run_report(tiny, fast_judge):
    _, run, _ = tiny
    evaluate(run, metrics=["judge"], **QUICK)
    secs = list((run / "report").glob("eval-eval_taxa-*.json"))   # default folder: eval/<settings>
    assert len(secs) == 1, secs
    sec = json.loads(secs[0].read_text())
    tables = [b for b in sec["blocks"] if "table" in b]
    per_level = next(b["table"] for b in tables if "species acc" in b["table"]["columns"]
                     and "conditioned on" in b["table"]["columns"])
    assert [r[0] for r in per_level["rows"]] == ["family", "species"]
    metrics = json.loads(next(run.glob("eval/taxa-*/metrics.json")).read_text())["results"]
    acc = metrics["judge"]["levels"]["species"]["accuracy"]["species"]
    assert per_level["rows"][1][per_level["columns"].index("species acc")] == acc  # the computed number
    few_shot = next(b["table"] for b in tables if b["table"]["columns"][0] == "bucket")
    assert [r[0] for r in few_shot["rows"]] == ["1", "2-5", "6-20", ">20"]

    images = [b["image"] for b in sec["blocks"] if "image" in b]
    assert [Path(i).name for i in images] == ["grid-family.png", "grid-species.png"]
    for i in images:   # linked relative to the run, saved in the eval folder
        assert not Path(i).is_absolute() and (run / i).is_file() and i.startswith("eval/")
    settings = json.loads(next(b["pre"] for b in sec["blocks"] if "pre" in b))
    assert settings["num_inference_steps"] == 2 and settings["metrics"] == ["judge"]

    page = (run / "report.html").read_text()
    assert sec["title"] in page and "judge FID" in page
    assert "6-20" in page and "grid-species.png" in page and "species acc" in page


def test_saved_pipeline_outside_a_run_gets_no_report(tiny, fast_judge, tmp_path, capsys):
    from taxadiffusion.sampling import load_for_sampling
    data, run, _ = tiny
    pipe, _ = load_for_sampling(run, device="cpu")
    pipe.save_pretrained(tmp_path / "exported")
    evaluate(tmp_path / "exported", real=str(data / "metadata.csv"), real_format="csv",
             real_root=str(data), metrics=["judge"], out=tmp_path / "eval", **QUICK)
    assert (tmp_path / "eval" / "metrics.json").exists()
    assert "no report" in capsys.readouterr().out
    assert not (tmp_path / "exported" / "report").exists()
    assert not (tmp_path / "exported" / "report.html").exists()


def test_missing_fid_weights_fail_before_any_image(tiny, tmp_path, monkeypatch):
    _, run, _ = tiny
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.setenv("TAXADIFFUSION_CACHE", str(tmp_path / "empty-cache"))
    before = _pngs(run / "eval")
    with pytest.raises(MissingWeightsError) as e:
        evaluate(run, metrics=["fid"], out=tmp_path / "eval", **QUICK)
    msg = str(e.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in msg
    assert str(tmp_path / "empty-torch-home" / "hub" / "checkpoints") in msg   # where it looked
    assert "--fid-weights" in msg and "eval.fid_weights" not in msg
    assert _pngs(tmp_path / "eval") == [] and _pngs(run / "eval") == before   # nothing sampled


def _evaluate_options() -> set[str]:
    import argparse

    from taxadiffusion.cli import _evaluate_args
    p = argparse.ArgumentParser()
    _evaluate_args(p)
    return {o for a in p._actions for o in a.option_strings}


def _cli(*args, env_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCH_HOME": str(env_dir / "torch"), "HF_HOME": str(env_dir / "hf"),
           "TAXADIFFUSION_CACHE": str(env_dir / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    env.pop("TAXADIFFUSION_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "taxadiffusion.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_missing_weights_name_only_options_evaluate_accepts(tiny, tmp_path):
    _, run, _ = tiny
    r = _cli("evaluate", str(run), "--metrics", "fid,lpips,bioclip", "--n-per-taxon", "2",
             "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "eval"), env_dir=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "taxadiffusion evaluate: error:" in r.stderr
    # every missing file is named at once, each with the option that gives it
    for needle in ("weights-inception-2015-12-05-6726825d.pth", "--fid-weights",
                   "alexnet-owt-7be5be79.pth", "--alexnet-weights", "BioCLIP", "--bioclip"):
        assert needle in r.stderr, needle
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", r.stderr))
    assert named and named <= _evaluate_options(), named - _evaluate_options()
    assert not re.search(r"\beval\.\w+", r.stderr) and "model.pretrained=" not in r.stderr
    assert _pngs(tmp_path / "eval") == []


def test_pretrained_option_reaches_the_loader(tiny, tmp_path):
    """sample and evaluate accept --pretrained; on a run whose backbone is built in code (nothing to
    point at) it is refused by name rather than silently ignored."""
    _, run, _ = tiny
    r = _cli("sample", str(run), "--taxon", "Corvus corax", "--n", "1", "--steps", "1", "--device", "cpu",
             "--pretrained", str(tmp_path / "sd15"), "--out", str(tmp_path / "s"), env_dir=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "--pretrained" in r.stderr and "'tiny' backbone" in r.stderr
    assert _pngs(tmp_path / "s") == []


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory, sd15_dir):
    """(run, the folder its SD base now lives in): a run on the tiny SD v1.5 stand-in, whose base
    folder was moved after training."""
    import shutil

    from taxadiffusion.training import train
    tmp = tmp_path_factory.mktemp("sdrun")
    sd = Path(shutil.copytree(sd15_dir, tmp / "sd15"))
    data = write_images(tmp / "data", size=64)
    ov = ["model.base=sd15", f"model.pretrained={sd}", "data.format=csv", f"data.root={data}",
          "data.ranks=[class, family, genus, species]", "data.resolution=64", "data.num_workers=0",
          "model.level_ff=64", "train.batch_size=2", "train.steps_stage0=2", "train.steps_per_stage=1",
          "train.checkpoint_every=100", "train.log_every=1", "train.validate_every=0",
          "train.validation_seeds=0", "train.fixed_batch=2", f"train.output_dir={tmp / 'runs'}", "name=sd"]
    with pytest.MonkeyPatch.context() as m:
        m.setenv("TAXADIFFUSION_CACHE", str(tmp / "cache"))
        run = Path(train(load_config("sd15-fishnet", ov)))
    return run, Path(sd.rename(tmp / "moved"))


def test_sd_run_whose_base_moved_names_pretrained_and_loads_with_it(sd_run, fast_judge, tmp_path):
    from taxadiffusion.checkpoint import resolve_checkpoint
    from taxadiffusion.sampling import load_for_sampling
    run, moved = sd_run
    cfg_file = resolve_checkpoint(run) / "config.json"
    before = cfg_file.read_text()
    with pytest.raises(FileNotFoundError) as e:     # sample / evaluate: they take --pretrained
        load_for_sampling(run, device="cpu", pretrained_option="--pretrained")
    assert "--pretrained /path/to" in str(e.value) and "model.pretrained=" not in str(e.value)
    with pytest.raises(FileNotFoundError) as e:     # commands without the option (traits, ...)
        load_for_sampling(run, device="cpu")
    assert "--pretrained" not in str(e.value) and f"Set model.pretrained in {cfg_file}" in str(e.value)

    pipe, _ = load_for_sampling(run, device="cpu", pretrained=str(moved), pretrained_option="--pretrained")
    img = pipe("Corvus corax", num_images=1, num_inference_steps=1, seed=0, output_type="uint8").images
    assert img.shape == (1, 3, 64, 64) and img.dtype == torch.uint8
    assert cfg_file.read_text() == before       # the checkpoint itself is not rewritten
    res = evaluate(run, metrics=["judge"], levels=["species"], n_per_taxon=1, steps=1, device="cpu",
                   pretrained=str(moved), out=tmp_path / "eval")
    assert res["judge"]["levels"]["species"]["n_images"] == 4


def test_fid_tables_per_level_and_per_class_reach_the_report(tiny, tmp_path, monkeypatch, random_inception):
    """With FID (torch-fidelity's Inception at random init, given by --fid-weights' path): the
    per-level FID table and the per-class table (paper Table S2 layout) are in the section."""
    _, run, _ = tiny
    weights = random_inception
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))   # only the given file
    monkeypatch.setenv("TAXADIFFUSION_CACHE", str(tmp_path / "cache"))
    out = run / "eval" / "fid-check"
    evaluate(run, metrics=["fid"], fid_weights=str(weights), out=out, **QUICK)
    sec = json.loads((run / "report" / "eval-eval_fid-check.json").read_text())
    tables = {tuple(b["table"]["columns"][:2]): b["table"] for b in sec["blocks"] if "table" in b}
    per_level = tables[("conditioned on", "taxa")]
    assert [r[0] for r in per_level["rows"]] == ["family", "species"] and "FID" in per_level["columns"]
    per_class = tables[("family", "lineage")]   # one row per family: Corvidae, Paridae
    assert sorted(r[0] for r in per_class["rows"]) == ["Corvidae", "Paridae"]
    assert (out / "grid-species.png").is_file()
    assert "One row per family" in (run / "report.html").read_text()
