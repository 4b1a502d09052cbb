"""The path GPU users run, on CPU: Stable Diffusion from a diffusers folder (the tiny stand-in of
tests/sdstub.py), latent space, bf16, trackers, several processes, kill and resume (issue 19)."""
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinyrun import write_images

SD_RUN = pytest.mark.xdist_group("sd")  # the tests of one shared run stay on one worker


def sd_overrides(sd: Path, data: Path, out: Path, name: str) -> list[str]:
    return [f"model.base=sd15", f"model.pretrained={sd}", "data.format=csv", f"data.root={data}",
            "data.ranks=[class, family, genus, species]", "data.resolution=64", "data.num_workers=0",
            "model.level_ff=64", "train.batch_size=2", "train.steps_stage0=4", "train.steps_per_stage=2",
            "train.checkpoint_every=2", "train.log_every=1", "train.validate_every=0",
            "train.validation_seeds=0", "train.fixed_batch=4", f"train.output_dir={out}", f"name={name}"]


def _env(tmp: Path, **extra) -> dict:
    return {**os.environ, "TAXADIFFUSION_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", **extra}


def _train(args: list[str], env: dict, *launcher: str) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [sys.executable]), "-m", "taxadiffusion.cli", "train", "--config", "sd15-fishnet",
           *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _weights(run: Path, pattern: str = "checkpoints/*/final/**/*.safetensors") -> dict:
    out = {}
    for f in sorted(run.glob(pattern)):
        if f.name in ("rng.safetensors",):
            continue
        for k, v in load_file(f).items():
            out[f"{f.relative_to(run)}:{k}"] = v
    return out


def _records(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """24 images at 64 px; two thirds of the rows lack a species (as FishNet's iNat-sourced rows)."""
    root = write_images(tmp_path_factory.mktemp("sddata") / "data", size=64)
    rows = list(csv.reader(open(root / "metadata.csv")))
    for i, r in enumerate(rows[1:]):
        if i % 3:
            r[-1] = ""
    with open(root / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root


@pytest.fixture(scope="module")
def progressive(sd15_dir, data, tmp_path_factory):
    """One progressive run, latents cached, bf16 from the launcher's setting, validation grids."""
    tmp = tmp_path_factory.mktemp("sdprog")
    args = sd_overrides(sd15_dir, data, tmp / "runs", "prog") + [
        "data.missing_ranks=fill", "data.cache_latents=true", "train.validate_every=2",
        "train.validation_seeds=2"]
    r = _train(args, _env(tmp, ACCELERATE_MIXED_PRECISION="bf16"))
    return tmp / "runs" / "prog", r, tmp


@SD_RUN
def test_cached_latents_bf16_from_launcher(progressive):
    """Breaks 1-3: the latent cache is written (it used to fail on the VAE's non-contiguous latent),
    bf16 comes from the launcher (`accelerate launch --mixed_precision bf16` sets this variable), and
    the bf16 validation grids decode (they failed on a float input to a bf16 VAE)."""
    run, r, tmp = progressive
    log = (run / "log.txt").read_text()
    assert "mixed precision bf16" in log
    from taxadiffusion.latent_cache import LatentCache
    cache = LatentCache(run / "latents")   # the run's own folder (latent_cache.py), centre crops: margin 0
    assert len(cache) == 24 and cache.read(0).shape == (4, 8, 8) and cache.slack == 0
    grids = sorted((run / "samples").glob("stage-*/step-*.png"))
    assert len(grids) == 2 + 3  # stage 0: step 2 and its end (4); each later stage its end (2)
    # trained weights stay fp32 in bf16 training
    cond = load_file(run / "checkpoints/stage-3-species/final/conditioner/diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in cond.values()} == {torch.float32}


@SD_RUN
def test_fixed_batch_loss_continues_across_stages(progressive):
    """Break 11: with zero-init levels, stage k's fixed-batch loss at step 0 is stage k-1's last."""
    run = progressive[0]
    fixed = [(r["stage"], r["step"], r["fixed_loss"]) for r in _records(run) if "fixed_loss" in r]
    stages = list(dict.fromkeys(s for s, _, _ in fixed))
    assert len(stages) == 4
    for prev, cur in zip(stages, stages[1:]):
        end = [l for s, _, l in fixed if s == prev][-1]
        start = next(l for s, st, l in fixed if s == cur and st == 0)
        assert start == end, (prev, cur, start, end)


@SD_RUN
def test_tensorboard_events_hold_losses_and_grids(progressive):
    """Break 7: init_trackers is called; the event file holds the loss curve, the learning rate,
    the level gains, the fixed-batch loss and the validation grids as images."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = progressive[0]
    events = sorted(run.glob("logs/**/events.out.tfevents.*"), key=lambda f: f.stat().st_size)
    assert events, sorted(str(p) for p in run.rglob("*"))[:20]
    ea = EventAccumulator(str(events[-1].parent), size_guidance={"images": 0}).Reload()
    scalars, images = set(ea.Tags()["scalars"]), set(ea.Tags()["images"])
    for tag in ("stage-0-class/loss", "stage-0-class/lr", "stage-0-class/level_gain/0",
                "stage-2-genus/fixed_loss"):
        assert tag in scalars, sorted(scalars)
    assert "stage-0-class/validation" in images and "stage-3-species/validation" in images
    losses = [e.value for e in ea.Scalars("stage-0-class/loss")]
    metrics = [r["loss"] for r in _records(run) if r.get("stage") == "stage-0-class" and "loss" in r]
    assert losses == pytest.approx(metrics)


def test_report_to_none_writes_no_events(sd15_dir, data, tmp_path):
    _train(sd_overrides(sd15_dir, data, tmp_path / "runs", "q") + [
        "train.report_to=none", "train.strategy=all", "train.steps_stage0=1", "train.steps_per_stage=0",
        "data.cache_latents=true", "train.checkpoint_every=0"], _env(tmp_path))
    run = tmp_path / "runs" / "q"
    assert (run / "checkpoints/stage-0-all/final/state.json").exists()
    assert not list(run.rglob("events.out.tfevents.*"))


@pytest.mark.parametrize("cache", ["true", "false"])
def test_kill_and_resume_is_bit_exact(sd15_dir, data, tmp_path, cache):
    """Break 5: SIGKILL after a checkpoint, `--resume latest`: every stage's final weights equal an
    uninterrupted run's, on the cached and the uncached (VAE every step) data path."""
    env = _env(tmp_path)
    common = ["data.missing_ranks=fill", f"data.cache_latents={cache}", "train.steps_stage0=8",
              "train.checkpoint_every=1", "model.level_dropout=0.1"]
    _train(sd_overrides(sd15_dir, data, tmp_path / "runs", "ref") + common, env)
    args = sd_overrides(sd15_dir, data, tmp_path / "runs", "killed") + common
    cmd = [sys.executable, "-m", "taxadiffusion.cli", "train", "--config", "sd15-fishnet", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run = tmp_path / "runs" / "killed"
    mark = run / "checkpoints" / "stage-0-class" / "step-3" / "state.json"
    t0 = time.time()
    while not mark.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() - t0 < 300
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "checkpoints" / "stage-0-class" / "final").exists(), "the kill came too late"
    _train(args + ["--resume", "latest"], env)
    ref, got = _weights(tmp_path / "runs" / "ref"), _weights(run)
    assert ref.keys() == got.keys() and len(ref) > 0
    diff = {k: float((ref[k].float() - got[k].float()).abs().max()) for k in ref if not torch.equal(ref[k], got[k])}
    assert not diff, sorted(diff.items(), key=lambda kv: -kv[1])[:5]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_all_levels_with_missing_species(sd15_dir, data, tmp_path):
    """Break 4: `all` with missing_ranks=keep under DDP: micro-batches without a species leave the
    species level without a sample; training still reduces every parameter, the ranks stay in step,
    and each rank keeps its own random state in the checkpoint."""
    env = _env(tmp_path)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(_free_port())]
    _train(sd_overrides(sd15_dir, data, tmp_path / "runs", "ddp") + [
        "train.strategy=all", "data.missing_ranks=keep", "data.cache_latents=true",
        "train.steps_stage0=6", "train.steps_per_stage=0", "train.checkpoint_every=3"], env, *launcher)
    run = tmp_path / "runs" / "ddp"
    r0 = json.loads((run / "ranks" / "stage-0-all-rank0.json").read_text())
    r1 = json.loads((run / "ranks" / "stage-0-all-rank1.json").read_text())
    assert r0["weights_sha256"] == r1["weights_sha256"]
    assert r0["sha256"] != r1["sha256"]          # different data on each rank
    rng = load_file(run / "checkpoints" / "stage-0-all" / "step-3" / "rng.safetensors")
    assert {"generator.0", "generator.1", "torch.0", "torch.1"} <= set(rng)
    assert not torch.equal(rng["generator.0"], rng["generator.1"])
    # the data really had micro-batches without a species: 16 of 24 rows lack one
    ids = list(csv.reader(open(data / "metadata.csv")))[1:]
    assert sum(1 for r in ids if not r[-1]) == 16


def test_lora_alpha_survives_reload(tmp_path):
    """Break 6: with lora_alpha=8 (r 4) a reloaded LoRA scales by 2.0, by our loader and by
    diffusers' load_lora_weights, and gives the same output as the trained module."""
    from diffusers import StableDiffusionPipeline
    from sdstub import build_sd15_stub, write_sd15_stub
    from taxadiffusion.backbone import add_lora
    from taxadiffusion.checkpoint import load_model_state, save_lora
    from taxadiffusion.config import ModelConfig
    mc = ModelConfig(lora_alpha=8)
    unet = build_sd15_stub()["unet"]
    add_lora(unet, mc)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # peft's init leaves B = 0: give the adapter an effect
    save_lora(unet, tmp_path)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    want = unet(x, t, ctx).sample

    ours = build_sd15_stub()["unet"]
    add_lora(ours, mc)
    load_model_state(tmp_path, ours, None)
    assert torch.allclose(ours(x, t, ctx).sample, want, atol=1e-6)

    pipe = StableDiffusionPipeline.from_pretrained(write_sd15_stub(tmp_path / "sd"), local_files_only=True)
    pipe.load_lora_weights(tmp_path, weight_name="pytorch_lora_weights.safetensors")
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer.scaling["default_0"] == 2.0
    assert torch.allclose(pipe.unet(x, t, ctx).sample, want, atol=1e-6)


def test_tokenizer_json_only_folder_loads(sd15_dir, sd15_json_dir):
    """Break 9: a folder whose tokenizer has tokenizer.json only (current transformers) loads and
    tokenizes as the BPE-file layout does; a folder with neither names what is missing."""
    import shutil
    from taxadiffusion.backbone import load_sd15, resolve_sd15
    from taxadiffusion.config import ModelConfig
    a = load_sd15(ModelConfig(pretrained=str(sd15_dir))).tokenizer
    b = load_sd15(ModelConfig(pretrained=str(sd15_json_dir))).tokenizer
    prompt = ["genus: Chaetodon", "species: Chaetodon auriga"]
    assert a(prompt, padding="max_length").input_ids == b(prompt, padding="max_length").input_ids
    broken = sd15_json_dir.parent / "broken"
    shutil.copytree(sd15_json_dir, broken)
    (broken / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer/tokenizer.json"):
        resolve_sd15(str(broken))


def test_grad_scaler_and_per_rank_rng_round_trip(tmp_path):
    """Break 5: fp16's GradScaler (scale, growth tracker) is saved and restored; each rank gets its
    own generator back, and a rank the checkpoint has no state for is refused by name."""
    from sdstub import build_sd15_stub
    from taxadiffusion.backbone import Backbone, noise_scheduler
    from taxadiffusion.checkpoint import load_training_state, rng_state, save_checkpoint
    from taxadiffusion.config import Config
    from taxadiffusion.taxonomy import Taxonomy
    parts = build_sd15_stub()
    cfg = Config()
    bb = Backbone(parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["vae"],
                  noise_scheduler(cfg.model, False), "sd15")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=100)
    scaler.scale(torch.ones(()))  # the scale exists once a loss was scaled
    scaler.update(512.0)
    scaler._growth_tracker.fill_(3)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    states = [rng_state(g) for g in gens]
    d = save_checkpoint(tmp_path / "ck", cfg=cfg, taxonomy=Taxonomy(["class"], [("Aves",)]),
                        unet=bb.unet, conditioner=None, backbone=bb, save_unet=False,
                        state={"stage_index": 0, "step": 5}, rng_states=states, scaler=scaler)
    for rank, seed in enumerate((1, 2)):
        g, s2 = torch.Generator().manual_seed(99), torch.amp.GradScaler("cpu")
        st = load_training_state(d, generator=g, rank=rank, scaler=s2)
        assert st["world_size"] == 2
        assert torch.equal(g.get_state(), torch.Generator().manual_seed(seed).get_state())
        assert s2.get_scale() == 512.0 and int(s2.state_dict()["_growth_tracker"]) == 3
    with pytest.raises(ValueError, match="none for rank 2"):
        load_training_state(d, generator=torch.Generator(), rank=2)


def test_level_dropout_stays_on_after_the_fixed_batch(sd15_dir, data, tmp_path):
    """The fixed-batch loss runs in eval mode before step 0; the trained level must be back in
    train mode afterwards (it was left in eval mode, so model.level_dropout never applied)."""
    def level0(dropout: str) -> dict:
        name = f"d{dropout}"
        _train(sd_overrides(sd15_dir, data, tmp_path / "runs", name) + [
            "train.strategy=all", "train.steps_stage0=2", "train.steps_per_stage=0",
            "train.checkpoint_every=0", "data.cache_latents=true", "train.report_to=none",
            f"model.level_dropout={dropout}"], _env(tmp_path))
        return load_file(tmp_path / "runs" / name / "checkpoints/stage-0-all/final/conditioner/"
                         "diffusion_pytorch_model.safetensors")
    off, on = level0("0.0"), level0("0.5")
    assert any(not torch.equal(off[k], on[k]) for k in off if k.startswith("levels.0."))


def _cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "taxadiffusion.cli", *args], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@SD_RUN
def test_cli_prepare_sample_export_evaluate_report(progressive, data, random_inception):
    """The rest of a user's session on the SD run: prepare the metadata, sample a trait row, export
    (diffusers layout), evaluate, rebuild the report; the export samples as the run does."""
    run, _, tmp = progressive
    env = _env(tmp)
    _cli(["prepare", "csv", str(data / "metadata.csv"), "--images", str(data), "--out", str(tmp / "prep"),
          "--ranks", "class,family,genus,species"], env)
    assert json.loads((tmp / "prep" / "taxonomy.json").read_text())["ranks"] == [
        "class", "family", "genus", "species"]
    _cli(["sample", str(run), "--taxon", "Corvus corax", "--n", "2", "--steps", "3", "--all-levels",
          "--out", str(tmp / "s")], env)
    assert len(list((tmp / "s").glob("level*-seed0-*.png"))) == 8
    _cli(["export", str(run), str(tmp / "export"), "--sample-steps", "2", "--sample-images", "1"], env)
    assert (tmp / "export" / "model_index.json").exists()
    weights = random_inception
    _cli(["evaluate", str(run), "--metrics", "fid", "--fid-weights", str(weights), "--n-per-taxon", "2",
          "--steps", "2", "--levels", "genus", "species", "--out", str(tmp / "ev")],
         {**env, "TORCH_HOME": str(tmp / "empty-torch-home")})
    fid = json.loads((tmp / "ev" / "metrics.json").read_text())["results"]["fid"]
    assert set(fid["levels"]) == {"genus", "species"}
    _cli(["report", str(run)], env)
    assert "FID" in (run / "report.html").read_text()

    from taxadiffusion.pipeline import TaxaDiffusionPipeline
    a = TaxaDiffusionPipeline.from_checkpoint(run)
    b = TaxaDiffusionPipeline.from_pretrained(tmp / "export")
    kw = dict(num_images_per_prompt=2, num_inference_steps=3, seed=5, output_type="uint8")
    assert torch.equal(a("Corvus corax", **kw).images, b("Corvus corax", **kw).images)


@pytest.mark.parametrize("strategy,cache,extra", [
    ("all", "false", ["train.gradient_checkpointing=true"]),
    ("random", "true", ["train.gradient_accumulation_steps=2"]),
    ("lora-text", "false", ["train.gradient_accumulation_steps=2"]),
    ("full", "true", ["train.gradient_checkpointing=true", "train.gradient_accumulation_steps=2"]),
])
def test_every_strategy_trains_in_latent_space(sd15_dir, data, tmp_path, strategy, cache, extra):
    """all / random / lora-text / full on the SD stand-in, latents cached or encoded every step,
    with gradient accumulation (each optimizer step consumes `accum` micro-batches) and gradient
    checkpointing; the parts the strategy trains change, the others do not."""
    steps = 3
    _train(sd_overrides(sd15_dir, data, tmp_path / "runs", "s") + [
        f"train.strategy={strategy}", f"data.cache_latents={cache}", f"train.steps_stage0={steps}",
        "train.steps_per_stage=0", "train.checkpoint_every=0", "train.report_to=none",
        "data.missing_ranks=fill", *extra], _env(tmp_path))
    run = tmp_path / "runs" / "s"
    final = next((run / "checkpoints").glob("stage-0-*/final"))
    rec = json.loads(next((run / "ranks").glob("*.json")).read_text())
    accum = 2 if "train.gradient_accumulation_steps=2" in extra else 1
    assert rec["served"] == steps * accum * 2
    base = load_file(sd15_dir / "unet" / "diffusion_pytorch_model.safetensors")
    if strategy == "full":
        unet = load_file(final / "unet" / "diffusion_pytorch_model.safetensors")
        assert any(not torch.equal(unet[k], base[k]) for k in base)
        assert not (final / "pytorch_lora_weights.safetensors").exists()
    else:
        lora = load_file(final / "pytorch_lora_weights.safetensors")
        assert any(float(v.abs().max()) > 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k)
        assert not (final / "unet").exists()  # the SD base is not copied
    assert (final / "conditioner").exists() == (strategy in ("all", "random"))


def test_text_embeddings_have_one_dtype_in_training_and_sampling():
    """At CLIP-L width the training tables are fp16; the pipeline's cache rounds the same way, so a
    level sees at sampling the numbers it was trained on (it used to get fp32 there)."""
    from transformers import CLIPTextConfig, CLIPTextModel
    from sdstub import build_sd15_stub
    from taxadiffusion.conditioning import embedding_dtype
    from taxadiffusion.pipeline import TaxaDiffusionPipeline
    from taxadiffusion.taxonomy import Taxonomy
    parts = build_sd15_stub()
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=512, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=8))
    pipe = TaxaDiffusionPipeline(parts["unet"], parts["scheduler"], te, parts["tokenizer"],
                                 taxonomy=Taxonomy(["class"], [("Aves",)]))
    assert embedding_dtype(768) == embedding_dtype(512) == torch.float16
    assert pipe.text_cache.encode(["class: Aves"]).dtype == torch.float16
    small = TaxaDiffusionPipeline(parts["unet"], parts["scheduler"], parts["text_encoder"],
                                  parts["tokenizer"], taxonomy=Taxonomy(["class"], [("Aves",)]))
    assert small.text_cache.encode(["class: Aves"]).dtype == torch.float32
