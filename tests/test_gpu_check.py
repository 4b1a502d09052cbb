"""benchmarks/gpu_check.py (issue 19) in its reduced mode on the CPU: it runs end to end, its JSON has
every number with positive finite timings, and its code-path table has an entry for every path."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

pytestmark = pytest.mark.xdist_group("train")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
# the list, written out here so that a path dropped from the script fails this test
PATHS = ["train-progressive-cache", "train-progressive-nocache", "train-all", "train-random",
         "train-lora-text", "train-full", "train-bf16", "train-grad-accum-2", "train-grad-checkpointing",
         "train-kill-resume", "train-2-processes", "sample", "export", "evaluate-judge", "report"]
RUN_IN_SMALL = {"train-progressive-cache": {"pass"}, "sample": {"pass"}, "report": {"pass"},
                "export": {"pass", "absent"}}  # export may not exist in this checkout yet


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--small", "--device", "cpu", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return json.loads(out.read_text()), r.stdout


def test_environment_and_settings(result):
    res, _ = result
    env = res["environment"]
    assert env["device"] == "cpu" and env["device_name"]
    for pkg in ("torch", "diffusers", "peft", "accelerate", "transformers"):
        assert env["versions"][pkg] == version(pkg)
    assert res["settings"]["small"] is True and res["settings"]["dtype"] == "bf16"
    assert positive(res["wall_s"]) and positive(res["unet_params"])


def test_training_steps(result):
    res, _ = result
    got = {(r["stage"], r["batch"]): r for r in res["train"]}
    assert set(got) == {(s, b) for s in ("stage-0-class", "stage-4-species") for b in (1, 2)}
    for r in got.values():
        assert "error" not in r, r
        assert positive(r["step_s_median"]) and all(positive(t) for t in r["step_s_all"])
        assert len(r["step_s_all"]) == r["steps"] and r["latents"] == [4, 8, 8]
        assert r["peak_mem_gib"] is None  # no CUDA allocator on the CPU
    # stage k trains one level encoder; stage 0 trains LoRA and level 0: strictly more
    assert 0 < got["stage-4-species", 1]["trainable_params"] < got["stage-0-class", 1]["trainable_params"]


def test_vae_and_sampling(result):
    res, _ = result
    v = res["vae_encode"]
    assert positive(v["s_per_image_median"]) and v["batch"] == 2
    assert [s["steps"] for s in res["sampling"]] == [2, 4]
    for s in res["sampling"]:
        assert s["measured"] and positive(s["seconds"]) and positive(s["s_per_image"])
        assert s["unet_calls"] >= s["steps"] and s["unet_batch"] == 2 * s["images"]


def test_code_path_table(result):
    res, stdout = result
    rows = {r["path"]: r for r in res["code_paths"]}
    assert [r["path"] for r in res["code_paths"]] == PATHS
    for p, r in rows.items():
        assert p in stdout  # the printed table has a row per path
        if p in RUN_IN_SMALL:
            assert r["status"] in RUN_IN_SMALL[p], r
            assert positive(r["seconds"]) and r["argv"]
        else:
            assert r["status"] == "skipped" and r["why"], r
        if r["status"] in ("fail", "absent"):
            assert r["stderr_tail"].strip()


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_import_check_comes_first(tmp_path, capsys, monkeypatch):
    """A missing module is named and the script stops before it builds or writes anything."""
    gc = _load_script()
    monkeypatch.setattr(gc, "NEEDED", {"json": "json", "no_such_module_gc": "no-such-wheel"})
    out = tmp_path / "r.json"
    assert gc.main(["--small", "--device", "cpu", "--out", str(out)]) == 3
    assert "no_such_module_gc: no-such-wheel" in capsys.readouterr().out
    assert not out.exists()


def test_docstring_names_the_wheels_of_this_venv():
    """The documented pip download pins what is installed here (what --wheels fetches)."""
    gc = _load_script()
    for dist in gc.WHEELS:
        assert f"{dist}=={version(dist)}" in gc.__doc__
