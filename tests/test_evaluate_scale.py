"""`evaluate` at scale (issue 22): generation split over processes gives the images, and the metrics,
of one process; a killed evaluation resumes, regenerating only the missing or damaged PNGs; the
generate loop keeps no image in memory, and metrics read the images back one taxon at a time."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tinyrun import tiny_overrides, write_images

pytestmark = pytest.mark.xdist_group("train")

N = 3   # images per taxon; the run samples in batches of 2, so a taxon is two units of work


def _env(tmp: Path) -> dict:
    env = {**os.environ, "TAXADIFFUSION_CACHE": str(tmp / "cache"), "TORCH_HOME": str(tmp / "torch"),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("TAXADIFFUSION_DEBUG", None)
    return env


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, random_inception):
    """(tmp folder, run, random-init FID Inception weights file) of a tiny run trained by the CLI."""
    tmp = tmp_path_factory.mktemp("evalscale")
    data = write_images(tmp / "data")
    ov = tiny_overrides(data, tmp / "runs", "t") + [
        "train.steps_stage0=2", "train.steps_per_stage=1", "train.checkpoint_every=100",
        "train.validation_seeds=0", "sample.batch_size=2"]
    subprocess.run([sys.executable, "-m", "taxadiffusion.cli", "train", "--config", "tiny-cpu", *ov],
                   check=True, env=_env(tmp), capture_output=True)
    weights = random_inception
    return tmp, tmp / "runs" / "t", weights


def _evaluate(tiny, out: Path, processes: int = 1) -> subprocess.CompletedProcess:
    tmp, run, weights = tiny
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(processes)] if processes > 1 else [sys.executable])
    cmd = [*launch, "-m", "taxadiffusion.cli", "evaluate", str(run), "--metrics", "fid",
           "--fid-weights", str(weights), "--levels", "family", "species", "--n-per-taxon", str(N),
           "--steps", "2", "--device", "cpu", "--out", str(out)]
    r = subprocess.run(cmd, env=_env(tmp), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _numbers(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())["results"]   # without its "created" time


def _pngs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "samples").rglob("*.png"))}


@pytest.fixture(scope="module")
def one(tiny):
    out = tiny[0] / "eval-1"
    _evaluate(tiny, out)
    return out


def test_two_processes_give_the_images_and_metrics_of_one(tiny, one):
    out = tiny[0] / "eval-2"
    _evaluate(tiny, out, processes=2)
    assert _pngs(out) == _pngs(one) and len(_pngs(one)) == 6 * N   # 2 families + 4 species
    assert _numbers(out) == _numbers(one)
    assert _numbers(one)["fid"]["levels"]["species"]["n_gen"] == 4 * N
    gen = json.loads((out / "generation.json").read_text())
    assert gen["processes"] == 2 and gen["generated"] == 6 * N and gen["reused"] == 0
    # 12 units of (taxon, batch of 2 or 1) dealt to the least loaded process: half the images each
    assert sorted(p["generated"] for p in gen["per_process"]) == [9, 9]


def test_a_killed_evaluation_resumes_with_only_what_is_missing(tiny, one):
    out = tiny[0] / "eval-resumed"
    shutil.copytree(one, out)
    files = sorted((out / "samples").rglob("*.png"))
    for f in files[:2]:
        f.unlink()
    files[2].write_bytes(files[2].read_bytes()[:40])   # a PNG cut off mid-write
    r = _evaluate(tiny, out)
    gen = json.loads((out / "generation.json").read_text())
    assert (gen["generated"], gen["damaged"], gen["reused"]) == (3, 1, 6 * N - 3)
    assert "3 generated (1 damaged PNGs regenerated)" in r.stdout
    assert _pngs(out) == _pngs(one)   # regenerated alone, still the same images
    assert _numbers(out) == _numbers(one)
    again = _evaluate(tiny, out)   # complete now: nothing generated, features reused
    assert "0 generated" in again.stdout and _numbers(out) == _numbers(one)


# -- in-process checks of the split and of memory (a stub pipeline) -------------------------------------
def _stub(alive: list, peak: list, calls: list):
    """A pipeline whose images are counted while alive (weakrefs): the most alive at once is `peak`."""
    def pipe(t, num_images, generator, **kw):
        calls.append(len(generator))
        imgs = torch.stack([torch.randint(0, 256, (3, 16, 16), generator=g, dtype=torch.uint8)
                            for g in generator])
        alive.append(1)
        weakref.finalize(imgs, alive.pop)
        peak[0] = max(peak[0], len(alive))
        return SimpleNamespace(images=imgs)
    return pipe


def _taxa(k: int):
    from taxadiffusion.taxonomy import Taxonomy
    from taxadiffusion.taxonomy import NONE_NAME
    tax = Taxonomy(["class", "family", "genus", "species"],
                   [("Aves", f"F{i % 3}", f"G{i}", f"s{i}") for i in range(k)])
    return [t for lvl in (1, 3) for t in tax.vocab(lvl) if t.name != NONE_NAME]


SETTINGS = {"seed": 0, "guidance": "taxa", "guidance_scale": 3.0, "guide_level": 0,
            "num_inference_steps": 2, "batch_size": 4}


def test_any_split_over_ranks_writes_the_same_images(tmp_path):
    from taxadiffusion.evaluation.samples import generate
    taxa = _taxa(5)
    one = generate(_stub([], [0], []), taxa, 6, tmp_path / "w1", SETTINGS, progress=False)
    stats = [generate(_stub([], [0], []), taxa, 6, tmp_path / "w3", SETTINGS, rank=r, world=3,
                      progress=False).stats for r in range(3)]
    assert sum(s["generated"] for s in stats) == one.stats["generated"] == 6 * len(taxa)
    assert all(torch.equal(one[t], one.__class__(tmp_path / "w3", taxa, 6)[t]) for t in taxa)


def test_generate_keeps_no_image_and_metrics_read_one_taxon_at_a_time(tmp_path, monkeypatch):
    from taxadiffusion.evaluation import stream
    from taxadiffusion.evaluation.samples import generate
    peaks = []
    for k in (4, 16):   # 4x the taxa: the most images alive at once does not grow
        alive, peak, calls = [], [0], []
        gen = generate(_stub(alive, peak, calls), _taxa(k), 6, tmp_path / f"k{k}", SETTINGS,
                       progress=False)
        assert max(calls) <= SETTINGS["batch_size"] and not alive   # one batch at a time, none kept
        peaks.append(peak[0])
        reads = []
        monkeypatch.setattr(stream.GeneratedImages, "take", lambda self, t, idx, f=stream.GeneratedImages.take:
                            reads.append(len(idx)) or f(self, t, idx))
        total = sum(int(gen[t].float().mean() >= 0) for t in gen)   # a metric's loop over taxa
        monkeypatch.undo()
        assert total == len(gen) and max(reads) == 6   # one taxon's images per read
    assert peaks == [1, 1]


def test_truncated_png_is_detected(tmp_path):
    from taxadiffusion.evaluation.samples import png_ok
    from taxadiffusion.imaging import save_pngs
    (f,) = save_pngs(torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8), ["a"], tmp_path)
    assert png_ok(f, 16) and not png_ok(f, 32)
    f.write_bytes(f.read_bytes()[:-20])
    assert not png_ok(f, 16)


def test_matched_subset_reads_the_rows_a_draw_on_the_concatenation_keeps():
    """The judge's matched real pool, read species by species, is the old draw on torch.cat."""
    from taxadiffusion.evaluation.judge_score import _match
    from taxadiffusion.evaluation.stream import matched_subset
    species = _taxa(3)[-3:]
    images = {t: torch.randint(0, 256, (k, 3, 4, 4), dtype=torch.uint8) for t, k in zip(species, (2, 5, 3))}
    whole = torch.cat([images[t] for t in species])
    for m in (1, 4, 9, 10, 12):
        assert torch.equal(matched_subset(images, species, m, seed=7), _match(whole, m, 7))
