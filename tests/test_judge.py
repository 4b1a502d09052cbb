"""The real-data judge: seeded per-species split, on-disk cache keyed by the data, scores, held-out
accuracy, evaluate(metrics=["judge"]) on a tiny run; real_data.py's up-front weight check."""
from __future__ import annotations

import functools
import importlib.util
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from taxadiffusion.config import load_config
from taxadiffusion.datasets import read_table
from taxadiffusion.evaluation import judge as judge_mod
from taxadiffusion.evaluation.judge import (JudgeConfig, judge_key, load_or_train_judge, load_split_images,
                                            split_records)
from taxadiffusion.evaluation.judge_score import judge_result
from taxadiffusion.evaluation.weights import MissingWeightsError

from tinyrun import LINEAGES, tiny_overrides, write_images

RANKS = ["class", "family", "genus", "species"]
FAST = JudgeConfig(steps=8, batch_size=8, width=4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("judge") / "data", per_species=6, size=20)


def _table(root: Path):
    table = read_table("csv", None, root, ranks=RANKS, missing="drop")
    return table, table.taxonomy()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("judge-cache")


@pytest.fixture(scope="module")
def judge(data, cache):
    table, tax = _table(data)
    return load_or_train_judge(table, tax, 16, FAST, cache_dir=cache, progress=False)


def _ids(pairs):
    return sorted(r.image_id for r, _ in pairs)


def test_split_is_per_species_seeded_and_row_order_free(data):
    table, tax = _table(data)
    s = split_records(table, tax, 0.2, seed=0)
    assert s.counts == {"species": 4, "species_single_image": 0, "train_images": 20, "held_out_images": 4,
                        "unknown_lineage": 0}
    for t in tax.species:   # round(0.2 * 6) = 1 held out per species, the rest trains
        assert sum(sp == t for _, sp in s.held_out) == 1 and sum(sp == t for _, sp in s.train) == 5
    assert set(_ids(s.train)).isdisjoint(_ids(s.held_out))
    assert sorted(_ids(s.train) + _ids(s.held_out)) == sorted(r.image_id for r in table.records)
    assert _ids(split_records(table, tax, 0.2, seed=0).held_out) == _ids(s.held_out)
    assert _ids(split_records(table, tax, 0.2, seed=1).held_out) != _ids(s.held_out)
    # row order does not matter, and one species' images do not move another species' split
    table.records.reverse()
    assert _ids(split_records(table, tax, 0.2, seed=0).held_out) == _ids(s.held_out)
    corax, single = tax.species[0], tax.species[1]   # keep 2 images of one species, 1 of another
    keep = {corax.path: ("_0.png", "_1.png"), single.path: ("_0.png",)}
    table.records = [r for r in table.records if r.lineage not in keep or r.image_id.endswith(keep[r.lineage])]
    s2 = split_records(table, tax, 0.2, seed=0)
    assert s2.counts["species_single_image"] == 1
    assert sum(sp == corax for _, sp in s2.held_out) == 1            # 2 images: 1 held out, 1 trains
    assert not [1 for _, sp in s2.held_out if sp == single]  # 1 image: trains only
    rest = lambda sp: sorted(r.image_id for r, t in sp if t in tax.species[2:])  # noqa: E731
    assert rest(s2.held_out) == rest(s.held_out)


def test_cache_is_reused_and_keyed_by_the_data(judge, data, cache, tmp_path, monkeypatch):
    assert judge.trained and judge.path.parent == cache
    assert sorted(p.name for p in judge.path.iterdir()) == ["judge.json", "judge.safetensors"]
    weights = judge.path / "judge.safetensors"
    mtime = weights.stat().st_mtime_ns
    table, tax = _table(data)
    # a second call must load, never train: training is made to fail loudly here
    monkeypatch.setattr(judge_mod, "train_judge", lambda *a, **k: pytest.fail("retrained"))
    again = load_or_train_judge(table, tax, 16, FAST, cache_dir=cache, progress=False)
    assert not again.trained and weights.stat().st_mtime_ns == mtime
    x, _, _ = load_split_images([(r, tax.make(r.lineage)) for r in table.records], "center", 16, False)
    assert torch.equal(judge.predict(x), again.predict(x))
    assert again.info["held_out_accuracy"] == judge.info["held_out_accuracy"]

    key = judge_key(table, tax, 16, FAST)
    assert key == judge.path.name
    assert judge_key(table, tax, 32, FAST) != key                       # resolution
    assert judge_key(table, tax, 16, replace(FAST, seed=1)) != key      # training recipe
    fewer, _ = _table(data)
    fewer.records = fewer.records[1:]
    assert judge_key(fewer, tax, 16, FAST) != key                       # one image fewer
    copy = shutil.copytree(data, tmp_path / "copy")
    t_copy, _ = _table(copy)
    assert judge_key(t_copy, tax, 16, FAST) == key                      # the same data, moved
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(copy / t_copy.records[0].image_id)
    assert judge_key(_table(copy)[0], tax, 16, FAST) != key             # an image replaced


def test_damaged_cache_is_an_error_not_a_retrain(judge, data, tmp_path):
    shutil.copytree(judge.path, tmp_path / judge.path.name)
    (tmp_path / judge.path.name / "judge.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RuntimeError, match="delete that folder"):
        load_or_train_judge(*_table(data), 16, FAST, cache_dir=tmp_path, progress=False)


def test_held_out_accuracy_and_scores(judge, data):
    info = judge.info
    assert info["split"]["held_out_images"] == 4 and info["split"]["train_images"] == 20
    for key in ("held_out_accuracy", "held_out_majority_baseline", "train_accuracy"):
        assert set(info[key]) == set(RANKS) and all(0 <= v <= 1 for v in info[key].values())
    assert info["held_out_accuracy"]["class"] == 1.0   # one class: its head cannot be wrong
    assert info["train_seconds"] >= 0 and info["resolution"] == 16

    table, tax = _table(data)
    real = {}
    for r in table.records:
        real.setdefault(tax.make(r.lineage), []).append(r)
    real = {t: load_split_images([(r, t) for r in rs], "center", 16, False)[0] for t, rs in real.items()}
    corvidae = tax.make(LINEAGES[0][:2])
    # "generated": each species shows another species' photos, so scores differ from 1 where they should
    order = sorted(real)
    gen = {t: real[order[(i + 1) % len(order)]][:3] for i, t in enumerate(order)}
    gen[corvidae] = real[order[0]][:3]
    res = judge_result(judge, gen, real, tax, {"seed": 0}, seed=0)
    assert res["kind"] == "judge" and set(res["levels"]) == {"family", "species"}
    sp = res["levels"]["species"]
    pred = {t: judge.predict(gen[t]) for t in order}
    want = sum(float((pred[t][:, 3] == tax.id(t)).sum()) for t in order) / (3 * len(order))
    assert sp["accuracy"]["species"] == pytest.approx(want)
    assert all(0 <= v <= 1 for lv in res["levels"].values() for v in lv["accuracy"].values())
    assert set(res["levels"]["family"]["accuracy"]) == {"class", "family"}   # ranks <= the level
    assert all(0 <= e["species_acc"] <= 1 and e["n"] == 3 for e in res["per_species"].values())
    assert sp["fid"] is not None and sp["fid"] >= -1e-6 and sp["kid_mean"] is not None
    assert sp["fid_small_n"]   # 12 images vs 16 feature dims: flagged
    prov = res["provenance"]
    assert prov["weights"]["judge"]["sha256"] and prov["weights"]["judge"]["key"] == judge.path.name
    assert prov["resolution"] == 16 and res["ceiling"]["held_out_accuracy"] == info["held_out_accuracy"]


def _load_real_data():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "real_data.py"
    spec = importlib.util.spec_from_file_location("real_data_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_evaluate_with_the_judge_on_a_tiny_run(data, tmp_path, monkeypatch):
    from taxadiffusion.evaluation.run import evaluate
    from taxadiffusion.training import train
    monkeypatch.setenv("TAXADIFFUSION_CACHE", str(tmp_path / "cache"))
    # the default recipe trains for minutes: a few steps here
    monkeypatch.setattr(judge_mod, "load_or_train_judge",
                        functools.partial(judge_mod.load_or_train_judge, cfg=FAST, progress=False))
    cfg = load_config("tiny-cpu", tiny_overrides(data, tmp_path / "runs", "j"))
    bench = _load_real_data()
    assert bench.judge_up_front(cfg).trained   # as real_data.py does before any diffusion training
    monkeypatch.setattr(judge_mod, "train_judge", lambda *a, **k: pytest.fail("evaluate() retrained"))
    run = train(cfg)
    res = evaluate(run, metrics=["judge"], levels=["family", "species"], n_per_taxon=2, steps=2,
                   out=tmp_path / "eval", device="cpu")
    assert list((tmp_path / "cache" / "judge").iterdir())       # trained into the cache root
    doc = json.loads((tmp_path / "eval" / "metrics.json").read_text())["results"]
    j = doc["judge"]
    assert set(j["levels"]) == {"family", "species"} and j["levels"]["species"]["n_images"] == 8
    assert j["provenance"]["library"] == "torchmetrics" and len(j["provenance"]["weights"]["judge"]["sha256"]) == 64
    assert j["ceiling"]["held_out_accuracy"]["species"] is not None
    assert "judge species acc" in doc["few_shot"]["provenance"]
    md = (tmp_path / "eval" / "metrics.md").read_text()
    assert "Judge ceiling" in md and "held-out accuracy" in md

    row = bench.numbers(res, ["family", "species"])   # the benchmark's row of this result
    assert row["judge acc species"] == j["levels"]["species"]["accuracy"]["species"]
    assert {"judge FID family", "judge KID species"} <= set(row) and row["judge species acc [6-20]"] is not None
    assert not any(k.startswith(("FID", "LPIPS", "BioCLIP")) for k in row)


def test_real_data_stops_on_missing_weights_before_training(data, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    bench = _load_real_data()
    for name in ("trained", "judge_up_front", "run_config"):
        monkeypatch.setattr(bench, name, lambda *a, **k: pytest.fail("started before the weight check"))
    argv = ["--data", str(data), "--metrics", "judge,fid", "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "out")]
    with pytest.raises(MissingWeightsError, match="weights-inception-2015-12-05-6726825d.pth") as e:
        bench.main(argv)
    assert "empty-torch-home" in str(e.value) and "How to get it" in str(e.value)
    assert not (tmp_path / "work").exists() and not (tmp_path / "out.json").exists()
    with pytest.raises(MissingWeightsError, match="AlexNet"):
        bench.check_weights(["lpips"])
    with pytest.raises(MissingWeightsError, match="BioCLIP"):
        bench.check_weights(["bioclip"], bioclip=str(tmp_path / "no-bioclip"))
    assert bench.check_weights(["judge"]) == {}
    given = tmp_path / "inception.pth"
    given.write_bytes(b"x")   # found by path only; loading it is evaluate()'s job
    assert bench.check_weights(["fid"], fid_weights=str(given)) == {"fid": str(given)}


def test_training_is_reproducible_and_leaves_the_callers_rng_alone(judge, data):
    table, tax = _table(data)
    x, sp, _ = load_split_images([(r, tax.make(r.lineage)) for r in table.records[:12]], "center", 16, False)
    y = torch.tensor([tax.ids(t) for t in sp])
    sizes = [tax.size(l) for l in range(4)]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = judge_mod.train_judge(x, y, sizes, replace(FAST, steps=3), progress=False).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    b = judge_mod.train_judge(x, y, sizes, replace(FAST, steps=3), progress=False).state_dict()
    c = judge_mod.train_judge(x, y, sizes, replace(FAST, steps=3, seed=1), progress=False).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
