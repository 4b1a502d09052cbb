"""Issue 23: values are checked where they enter (config fields by type and range, CLI flags by
argparse types), and `main` turns every expected failure into one line and exit 2."""
import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from taxadiffusion import cli
from taxadiffusion.config import (PRESET_DIR, Config, SampleConfig, TrainConfig, config_from_file, from_dict,
                                  load_config, save_config)

# override, field the error names, words of what is allowed
BAD_OVERRIDES = [
    ("train.lr=abc", "train.lr", "> 0"),
    ("train.seed=1.5", "train.seed", "in [0, "),
    ("train.batch_size=4.5", "train.batch_size", ">= 1"),
    ("train.batch_size=0", "train.batch_size", ">= 1"),
    ("train.batch_size=-1", "train.batch_size", ">= 1"),
    ("train.steps_per_stage=-3", "train.steps_per_stage", ">= 0"),
    ("train.ema_decay=2", "train.ema_decay", "in [0, 1)"),
    ("train.p_uncond=1.5", "train.p_uncond", "in [0, 1]"),
    ("train.max_grad_norm=.nan", "train.max_grad_norm", "finite"),
    ("sample.scale=.inf", "sample.scale", "finite"),
    ("name=../../x", "name", "no path separators"),
    ("train.strategy=nope", "train.strategy", "one of progressive, all, random, lora-text, full"),
    ("data.resolution=30", "data.resolution", "multiple of 8"),
]
ids = [o for o, *_ in BAD_OVERRIDES]


@pytest.mark.parametrize("override,key,allowed", BAD_OVERRIDES, ids=ids)
def test_bad_override_names_field_value_and_range(override, key, allowed):
    with pytest.raises((ValueError, TypeError)) as e:
        load_config("tiny-cpu", [override])
    msg = str(e.value)
    assert msg.startswith(f"{key}: ") and allowed in msg and "\n" not in msg, msg
    assert "tiny-cpu.yaml" not in msg  # the value came from the command line, not the preset


@pytest.mark.parametrize("override,key,allowed", BAD_OVERRIDES, ids=ids)
def test_bad_override_through_the_cli_is_one_line_exit_2(override, key, allowed):
    r = subprocess.run([sys.executable, "-m", "taxadiffusion.cli", "train", "--config", "tiny-cpu", override],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"taxadiffusion train: error: {key}: "), r.stderr


def test_more_config_checks():
    for ov in (["train.p_uncond=0.6", "train.p_prefix=0.6"], ["sample.guidance_start=0.8", "sample.guidance_stop=0.2"],
               ["train.steps_stage0=0"], ["train.stages=first"], ["train.lr=0"], ["train.lr=-1e-3"],
               ["sample.steps=0"], ["train.mixed_precision=fp8"], ["data.format=tsv"], ["name=."],
               ["name=a/b"], ["data.ranks=[]"], ["model.cross_attn_levels=[true]"], ["train.log_every=0"],
               ["model.beta_start=0.1", "model.beta_end=0.01"], ["train.seed=-1"], ["train.lr=["]):
        with pytest.raises((ValueError, TypeError), match=ov[0].split("=")[0].split(".")[-1]):
            load_config("tiny-cpu", ov)
    # the edges of each range are allowed
    cfg = load_config("tiny-cpu", ["train.ema_decay=0", "train.p_uncond=1", "train.p_prefix=0", "train.seed=0",
                                   "train.steps_per_stage=0", "sample.guidance_start=0.5",
                                   "sample.guidance_stop=0.5", "sample.scale=-1", "name=my_run-2.b"])
    assert cfg.train.p_uncond == 1.0 and cfg.name == "my_run-2.b"


def test_direct_construction_and_from_dict_check_too():
    with pytest.raises(ValueError, match=r"^train.batch_size: 0 is not allowed"):
        TrainConfig(batch_size=0)
    with pytest.raises(TypeError, match=r"^train.batch_size: expected int"):
        TrainConfig(batch_size=4.5)
    with pytest.raises(ValueError, match=r"^name: '../x'"):
        Config(name="../x")
    with pytest.raises(ValueError, match=r"^sample_defaults.steps: 0"):  # the caller's prefix
        from_dict({"steps": 0}, SampleConfig, "sample_defaults.")
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)


def test_a_value_from_a_file_names_the_file(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("train:\n  batch_size: 0\n")
    with pytest.raises(ValueError, match=r"train.batch_size: 0 .* \(in .*mine.yaml\)$"):
        load_config(p)
    assert load_config(p, ["train.batch_size=2"]).train.batch_size == 2  # overridden: not the file's
    p.write_text("train: [1\n")
    with pytest.raises(ValueError, match=r"mine.yaml: not valid YAML at line 2"):
        load_config(p)
    j = tmp_path / "config.json"  # json.dumps writes NaN, which is not JSON
    j.write_text(json.dumps({"train": {"max_grad_norm": float("nan")}}))
    with pytest.raises(ValueError, match=r"train.max_grad_norm: nan .* \(in .*config.json\)$"):
        config_from_file(j)


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_every_shipped_preset_loads_and_round_trips(preset, tmp_path):
    cfg = load_config(preset)
    save_config(cfg, tmp_path / "c.yaml")
    assert config_from_file(tmp_path / "c.yaml") == cfg


def test_choice_lists_match_their_sources():
    from taxadiffusion import config, stages, training, pipeline, backbone
    from taxadiffusion.datasets import READERS
    from taxadiffusion.datasets.images import PREPROCESS
    assert config.STRATEGIES == stages.STRATEGIES and config.TRACKERS == training.TRACKERS
    assert config.SCHEDULERS == tuple(pipeline.SCHEDULERS) and config.BASES == tuple(backbone.BUILDERS)
    assert config.PREPROCESS == tuple(PREPROCESS)
    with pytest.raises(ValueError, match=", ".join(READERS)):
        load_config(None, ["data.format=nope"])


def test_config_and_cli_import_without_torch():
    code = "import sys, taxadiffusion.config, taxadiffusion.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _main(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv,flag", [
    (["sample", "RUN", "--taxon", "x", "--n", "0"], "--n"),
    (["sample", "RUN", "--taxon", "x", "--steps", "0"], "--steps"),
    (["sample", "RUN", "--taxon", "x", "--scale", "nan"], "--scale"),
    (["sample", "RUN", "--taxon", "x", "--scale", "inf"], "--scale"),
    (["sample", "RUN", "--taxon", "x", "--seed", "-1"], "--seed"),
    (["sample", "RUN", "--taxon", "x", "--seed", "1.5"], "--seed"),
    (["sample", "RUN", "--taxon", "x", "--guide-level", "-1"], "--guide-level"),
    (["sample", "RUN", "--taxon", "x", "--batch-size", "0"], "--batch-size"),
    (["sample", "RUN", "--taxon", "x", "--guidance-interval", "0.7,0.2"], "--guidance-interval"),
    (["sample", "RUN", "--taxon", "x", "--guidance-interval", "0,2"], "--guidance-interval"),
    (["evaluate", "RUN", "--n-per-taxon", "0"], "--n-per-taxon"),
    (["evaluate", "RUN", "--max-taxa", "-2"], "--max-taxa"),
    (["export", "RUN", "OUT", "--sample-steps", "0"], "--sample-steps"),
    (["export", "RUN", "OUT", "--sample-images", "0"], "--sample-images"),
    (["traits", "RUN", "--taxon", "x", "--n", "0"], "--n"),
    (["attention", "RUN", "--taxon", "x", "--window", "0.5"], "--window"),
    (["embeddings", "RUN", "--level", "genus", "--perplexity", "0"], "--perplexity"),
    (["demo", "--minutes", "nan"], "--minutes"),
])
def test_bad_flags_are_argparse_errors(argv, flag, capsys):
    code, err = _main(argv, capsys)
    assert code == 2 and f"error: argument {flag}: " in err and "Traceback" not in err, err


def test_good_flags_parse_as_before(monkeypatch):
    seen = {}
    monkeypatch.setitem(cli.COMMANDS, "sample", (*cli.COMMANDS["sample"][:2], lambda a: seen.update(vars(a))))
    cli.main(["sample", "RUN", "--taxon", "x", "--n", "3", "--scale", "-1.5", "--guidance-interval", "0,0.6",
              "--seed", "0", "--scheduler", "dpm++"])
    assert seen["n"] == 3 and seen["scale"] == -1.5 and seen["guidance_interval"] == "0,0.6"
    assert seen["seed"] == 0 and seen["debug"] is False


def _failing(monkeypatch, exc):
    def run(a):
        raise exc
    monkeypatch.setitem(cli.COMMANDS, "report", (*cli.COMMANDS["report"][:2], run))


@pytest.mark.parametrize("exc", [
    FileNotFoundError(2, "No such file or directory", "/x/model.safetensors"),
    PermissionError(13, "Permission denied", "/x"), IsADirectoryError(21, "Is a directory", "/x"),
    OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EROFS, "Read-only file system"),
    OSError(errno.EACCES, "Permission denied"), json.JSONDecodeError("Expecting value", "{", 1),
    yaml.YAMLError("bad\nyaml"), KeyError("unknown scheduler 'x'"), ValueError("bad value"),
], ids=lambda e: type(e).__name__)
def test_expected_errors_are_one_line_exit_2(exc, monkeypatch, capsys):
    _failing(monkeypatch, exc)
    code, err = _main(["report", "RUN"], capsys)
    assert code == 2 and err.startswith("taxadiffusion report: error: ") and len(err.strip().splitlines()) == 1


def test_a_safetensors_error_is_expected(tmp_path, monkeypatch, capsys):
    from safetensors import safe_open
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")  # a truncated download
    monkeypatch.setitem(cli.COMMANDS, "report", (*cli.COMMANDS["report"][:2],
                                                 lambda a: safe_open(str(bad), framework="numpy")))
    code, err = _main(["report", "RUN"], capsys)
    assert code == 2 and err.startswith("taxadiffusion report: error: "), err


def test_unexpected_error_is_one_line_unless_debug(monkeypatch, capsys):
    _failing(monkeypatch, RuntimeError("boom"))
    code, err = _main(["report", "RUN"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "unexpected" in err and "RuntimeError: boom" in err and "--debug" in err
    _failing(monkeypatch, TypeError("f() got an unexpected keyword argument 'x'"))  # a bug, not input
    assert _main(["report", "RUN"], capsys)[0] == 1
    with pytest.raises(TypeError):
        cli.main(["--debug", "report", "RUN"])
    with pytest.raises(TypeError):
        cli.main(["report", "RUN", "--debug"])
    monkeypatch.setenv("TAXADIFFUSION_DEBUG", "1")
    with pytest.raises(TypeError):
        cli.main(["report", "RUN"])


def test_keyboard_interrupt_is_one_line_exit_130(monkeypatch, capsys):
    _failing(monkeypatch, KeyboardInterrupt())
    code, err = _main(["report", "RUN"], capsys)
    assert code == 130 and err.strip() == "taxadiffusion report: interrupted"


def test_debug_prints_the_traceback_in_a_process(tmp_path):
    code = ("import sys; from taxadiffusion import cli\n"
            "def boom(a): raise RuntimeError('boom')\n"
            "cli.COMMANDS['report'] = (*cli.COMMANDS['report'][:2], boom)\n"
            "cli.main(sys.argv[1:])\n")
    r = subprocess.run([sys.executable, "-c", code, "--debug", "report", "RUN"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" in r.stderr and "RuntimeError: boom" in r.stderr
