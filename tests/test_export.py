"""`taxadiffusion export` (issue 19): a tiny SD-stand-in run trained with LoRA alpha 8 is exported in
diffusers' layout; the export samples as the run does through our loader and, in a fresh process,
through diffusers' DiffusionPipeline; alpha survives; the card and the hub upload (monkeypatched)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from taxadiffusion.cli import main
from taxadiffusion.config import from_dict, load_config
from taxadiffusion.export import default_base_model, export_run
from taxadiffusion.pipeline_io import SHIM_FILE, SHIM_SOURCE
from taxadiffusion.pipeline import TaxaDiffusionPipeline
from taxadiffusion.taxonomy import Taxonomy
from tinyrun import write_images

pytestmark = pytest.mark.xdist_group("train")
BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CALL = dict(num_images_per_prompt=2, seed=3, output_type="pt")  # settings: the run's defaults


@pytest.fixture(scope="module")
def run(tmp_path_factory, sd15_dir):
    """6 steps of `all` on the SD stand-in, LoRA alpha 8 (scale 2), sample defaults of its own, and
    an evaluation's metrics files as `taxadiffusion evaluate` leaves them."""
    from taxadiffusion.training import train
    tmp = tmp_path_factory.mktemp("export-run")
    data = write_images(tmp / "data", size=64)
    over = [f"model.pretrained={sd15_dir}", "model.base=sd15", "data.format=csv", f"data.root={data}",
            "data.ranks=[class, family, genus, species]", "data.resolution=64", "model.level_ff=64",
            "model.lora_alpha=8", "train.strategy=all", "train.batch_size=2", "train.steps_stage0=3",
            "train.steps_per_stage=1", "train.checkpoint_every=0", "train.log_every=1",
            "train.validate_every=0", "train.validation_seeds=0", "train.fixed_batch=0",
            f"train.output_dir={tmp / 'runs'}", "name=r", "data.num_workers=0",
            "sample.steps=3", "sample.scale=2.5", "sample.scheduler=pndm"]
    with pytest.MonkeyPatch.context() as m:
        m.setenv("TAXADIFFUSION_CACHE", str(tmp / "cache"))
        run = Path(train(load_config("sd15-fishnet", over)))
    ev = run / "eval" / "taxa-s2.5"
    ev.mkdir(parents=True)
    (ev / "metrics.json").write_text(json.dumps({"results": {"fid": {"species": 12.3}}}))
    (ev / "metrics.md").write_text("# Metrics\n\n## FID by level\n\n| level | FID |\n|---|---|\n"
                                   "| species | 12.3 |\n")
    return run


@pytest.fixture(scope="module")
def export(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "birds"
    export_run(run, out, scheduler="ddim", sample_steps=2, sample_images=2, base_model=BASE,
               datasets=["someone/bird-photos"], device="cpu")
    return out


@pytest.fixture(scope="module")
def reference(run):
    """The run's own sampling, with the sampler the export saved."""
    pipe = TaxaDiffusionPipeline.from_checkpoint(run, scheduler="ddim")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def exported(export):
    pipe = TaxaDiffusionPipeline.from_pretrained(export)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _lora_scalings(unet) -> set:
    return {v for m in unet.modules() if hasattr(m, "scaling") for v in m.scaling.values()}


def test_export_is_diffusers_layout_safetensors_only(export, run):
    files = {f.relative_to(export).as_posix() for f in export.rglob("*") if f.is_file()}
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == ["taxadiffusion_pipeline", "TaxaDiffusionPipeline"]
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "conditioner"):
        assert (export / sub).is_dir() and index[sub][0] is not None, sub
    assert index["conditioner"] == ["taxadiffusion.conditioning", "TaxonomyConditioner"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    # safetensors, JSON, text, the card, the grid; one .py: the shim, which only imports the package
    assert {Path(f).suffix for f in files} <= {".safetensors", ".json", ".txt", ".md", ".png", ".py"}
    assert [f for f in files if f.endswith(".py")] == [SHIM_FILE]
    assert (export / SHIM_FILE).read_text() == SHIM_SOURCE
    assert {"unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
            "pytorch_lora_weights.safetensors", "README.md", "training_config.json",
            "samples/trait-grid.png", "eval/taxa-s2.5/metrics.json", "eval/taxa-s2.5/metrics.md"} <= files
    with safe_open(export / "pytorch_lora_weights.safetensors", "pt") as f:
        assert f.keys() and all(k.startswith("unet.") for k in f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.lora_alpha"] == 8 and meta["unet.r"] == 4
    with safe_open(export / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert not any("lora" in k or "base_layer" in k for k in f.keys())  # unfused: base only
    ckpt_cfg = json.loads(next(run.glob("checkpoints/*/final/config.json")).read_text())
    assert json.loads((export / "training_config.json").read_text()) == ckpt_cfg
    assert Taxonomy.from_dict(index["taxonomy"]) == Taxonomy.load(run / "taxonomy.json")


def test_reloaded_export_samples_as_the_run(export, exported, reference):
    for taxon, level in (("Corvus corax", None), ("Pica pica", "family")):
        a = reference(taxon, level=level, **CALL).images
        b = exported(taxon, level=level, **CALL).images
        assert torch.equal(a, b), taxon


def test_lora_alpha_survives_the_export(exported, reference):
    assert _lora_scalings(reference.unet) == {2.0}   # alpha 8 / r 4, from the run's config
    assert _lora_scalings(exported.unet) == {2.0}    # from the LoRA file's metadata
    layers = [m for m in exported.unet.modules() if hasattr(m, "scaling")]
    assert torch.equal(reference("Corvus corax", **CALL).images, exported("Corvus corax", **CALL).images)
    saved = [dict(m.scaling) for m in layers]
    try:  # what a lost alpha (diffusers' default alpha = r) gives: other images
        for m in layers:
            m.scaling = {k: 1.0 for k in m.scaling}
        assert not torch.equal(reference("Corvus corax", **CALL).images,
                               exported("Corvus corax", **CALL).images)
    finally:
        for m, s in zip(layers, saved):
            m.scaling = s


def test_diffusers_loads_the_export_in_a_fresh_process(export, exported, tmp_path):
    script = f"""
import json, sys
import numpy as np, torch
torch.set_num_threads({torch.get_num_threads()})
from diffusers import DiffusionPipeline
assert "taxadiffusion" not in sys.modules
try:
    DiffusionPipeline.from_pretrained({str(export)!r})
    sys.exit("loaded a pipeline class diffusers does not ship without trust_remote_code")
except ValueError as e:
    assert "trust_remote_code" in str(e), e
pipe = DiffusionPipeline.from_pretrained({str(export)!r}, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
np.save({str(tmp_path / "img.npy")!r}, pipe("Corvus corax", num_images_per_prompt=2, seed=3,
                                             output_type="np").images)
print(json.dumps({{"cls": type(pipe).__module__ + "." + type(pipe).__name__,
                  "conditioner": type(pipe.conditioner).__name__, "taxa": len(pipe.taxonomy.species),
                  "steps": pipe.sample_config.steps,
                  "scaling": sorted({{v for m in pipe.unet.modules() if hasattr(m, "scaling")
                                     for v in m.scaling.values()}})}}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"cls": "taxadiffusion.pipeline.TaxaDiffusionPipeline",
                   "conditioner": "TaxonomyConditioner", "taxa": 4, "steps": 3, "scaling": [2.0]}
    ours = exported("Corvus corax", num_images_per_prompt=2, seed=3, output_type="np").images
    assert np.array_equal(np.load(tmp_path / "img.npy"), ours)


def test_our_loader_runs_no_code_from_the_folder(export, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(export, copy)
    marker = tmp_path / "ran"
    (copy / SHIM_FILE).write_text(f"open({str(marker)!r}, 'w').close()\nraise RuntimeError('ran')\n")
    pipe = TaxaDiffusionPipeline.from_pretrained(copy)
    assert not marker.exists() and _lora_scalings(pipe.unet) == {2.0}
    index = json.loads((copy / "model_index.json").read_text())
    for key, value in (("conditioner", ["os", "system"]), ("_class_name", ["evil", "Pipeline"])):
        (copy / "model_index.json").write_text(json.dumps({**index, key: value}))
        with pytest.raises(ValueError, match="TaxaDiffusionPipeline"):  # compared, never imported
            TaxaDiffusionPipeline.from_pretrained(copy)


def test_export_carries_the_runs_sample_defaults(export, exported):
    sc = exported.sample_config
    assert (sc.steps, sc.scale, sc.scheduler, sc.guidance) == (3, 2.5, "ddim", "taxa")
    steps = []
    default = exported("Corvus corax", seed=1, output_type="pt",
                       callback_on_step_end=lambda p, i, t, kw: steps.append(i)).images
    assert steps == [0, 1, 2]
    assert torch.equal(default, exported("Corvus corax", seed=1, output_type="pt", guidance="taxa",
                                         guidance_scale=2.5, num_inference_steps=3).images)


def test_model_card_has_the_hub_header_the_config_and_the_metrics(export):
    card = (export / "README.md").read_text()
    assert card.startswith("---\n")
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["base_model"] == BASE and header["datasets"] == ["someone/bird-photos"]
    assert header["license"] == "creativeml-openrail-m" and header["library_name"] == "diffusers"
    assert {"diffusers", "text-to-image", "taxonomy", "lora"} <= set(header["tags"])
    block = card.split("## Training configuration")[1].split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(block) == json.loads((export / "training_config.json").read_text())
    assert "![trait grid](samples/trait-grid.png)" in card
    assert "### taxa-s2.5" in card and "| species | 12.3 |" in card
    assert "alpha 8: scale 2" in card and "trust_remote_code=True" in card


def test_card_base_model_from_the_config():
    cfg = from_dict({"model": {"base": "sd15", "pretrained": BASE}})
    assert default_base_model(cfg) == BASE
    cfg.model.pretrained = "/home/u/.cache/huggingface/hub/models--org--sd-v1/snapshots/abc"
    assert default_base_model(cfg) == "org/sd-v1"
    cfg.model.pretrained = "/data/my-sd15"
    assert default_base_model(cfg) is None
    assert default_base_model(from_dict({"model": {"base": "tiny"}})) is None


def test_push_to_hub_uploads_the_folder(run, tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))

    def upload(self, folder_path, repo_id, **kw):
        calls.append(("upload", repo_id, folder_path, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(HfApi, "upload_folder", upload)
    out = tmp_path / "pushed"
    main(["export", str(run), str(out), "--push-to-hub", "me/taxa-birds", "--private",
          "--sample-steps", "1", "--sample-images", "1", "--device", "cpu"])
    assert [c[0] for c in calls] == ["create", "upload"]
    assert calls[0][1] == "me/taxa-birds" and calls[0][2]["private"] is True
    assert calls[1][1:3] == ("me/taxa-birds", str(out))
    assert {"README.md", "model_index.json", "unet"} <= set(calls[1][3])  # complete when uploaded
    assert 'from_pretrained("me/taxa-birds"' in (out / "README.md").read_text()


def test_export_refuses_a_folder_in_use(run, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        export_run(run, tmp_path)
    with pytest.raises(ValueError, match="not an export"):
        export_run(run, tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
