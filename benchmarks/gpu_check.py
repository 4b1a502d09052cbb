"""GPU check (issue 19): SD v1.5-size training and sampling speed, and every user code path on CUDA.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json] [--device cuda]
    python benchmarks/gpu_check.py --small --device cpu    # tiny widths, 1-2 steps: ~1 min on a CPU
    python benchmarks/gpu_check.py --wheels .whl           # here (PyPI): fetch what the GPU machine lacks

About 4-8 minutes on one H200. It reports:
1. Training step time (median after warm-up, torch.cuda.synchronize around each step) and peak memory
   (torch.cuda.max_memory_allocated) of SD v1.5's shapes at random init (UNet 860M, VAE, CLIP-L;
   backbone.build_sd15_random), bf16 at 512 px (latents 4x64x64), batch 1 and the preset's 12, for
   stage 0 (LoRA + level 0 train) and stage k (level k alone; context = levels 0..k), on precomputed
   latents and text embeddings: training.py's step. And VAE encode time per image (the uncached path).
2. TaxaGuide sampling time (TaxaDiffusionPipeline: reference and condition in one batched UNet call per
   step) for 25 and 250 steps; a run whose linear estimate exceeds --sample-budget is extrapolated.
3. Whether the CLI paths run on the tiny SD v1.5 stand-in of tests/sdstub.py, each as a subprocess:
   train with each strategy, cache on/off, bf16, gradient accumulation 2, gradient checkpointing,
   SIGKILL + --resume latest, 2 processes (when there are 2 GPUs); sample, export, evaluate --metrics
   judge, report. A failure is reported with the end of its stderr; the rest still runs.
Prints a table and writes JSON (--out).

Wheels. The GPU machine has torch, accelerate, peft, transformers, safetensors, huggingface_hub, timm,
torchmetrics, tensorboard, matplotlib, pyyaml, pillow, regex, but no diffusers and no network. NEEDED
(what this script and the paths it runs import) minus that machine's package list
(.library/device/KINDS.md) is diffusers, open_clip_torch (backbone.clip_vocabulary reads its BPE file)
and open_clip's ftfy, which needs wcwidth (torch-fidelity and lpips: only --metrics fid/lpips import
them; the judge's FID/KID through torchmetrics run without torch-fidelity). `--wheels DIR` runs, with the versions installed here:
    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d DIR \\
        diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
and with --own-wheel also `pip wheel --no-deps -w DIR .`, which a checkout does not need: when
taxadiffusion is not installed the script puts the checkout's src/ on sys.path and on the subprocesses'
PYTHONPATH. Install there with `python3 -m pip install -q --no-index --no-deps --target /tmp/site
DIR/*.whl && export PYTHONPATH=/tmp/site`. The script's first step imports NEEDED and names what fails.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# module -> distribution: everything this script or a code path it runs imports
NEEDED = {"torch": "torch", "torchvision": "torchvision", "diffusers": "diffusers",
          "transformers": "transformers", "peft": "peft", "accelerate": "accelerate",
          "safetensors": "safetensors", "huggingface_hub": "huggingface_hub",
          "open_clip": "open_clip_torch", "ftfy": "ftfy", "tqdm": "tqdm", "yaml": "pyyaml",
          "PIL": "pillow", "numpy": "numpy", "matplotlib": "matplotlib",
          "torchmetrics": "torchmetrics", "tensorboard": "tensorboard", "filelock": "filelock"}
WHEELS = ["diffusers", "open_clip_torch", "ftfy", "wcwidth"]  # NEEDED that the GPU machine lacks
VERSIONS = ["torch", "diffusers", "peft", "accelerate", "transformers", "safetensors",
            "huggingface_hub", "open_clip_torch"]
RANKS = ("class", "order", "family", "genus", "species")  # the sd15-fishnet preset's 5 levels
DTYPE_NAME = "bf16"
torch = None  # imported by main() once the import check has passed


# -- 0. imports, wheels, environment ------------------------------------------------------------------
def missing_modules() -> dict[str, str]:
    """Import each needed module (finding it is not enough: open_clip without ftfy is found)."""
    miss = {}
    for mod, dist in NEEDED.items():
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001 - any failure to import is what we report
            miss[mod] = f"{dist} ({type(e).__name__}: {str(e)[:120]})"
    return miss


def use_checkout_src() -> str:
    """Where taxadiffusion comes from: the installed package, else this checkout's src/."""
    if importlib.util.find_spec("taxadiffusion") is None:
        sys.path.insert(0, str(REPO / "src"))
    import taxadiffusion
    return str(Path(taxadiffusion.__file__).parent)


def fetch_wheels(folder: Path, own: bool) -> None:
    from importlib.metadata import version
    # the GPU machine's Python and platform, whatever this machine's (wcwidth's wheel is abi3 x86-64)
    target = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_17_x86_64",
              "--platform", "manylinux2014_x86_64"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *target,
           "-d", str(folder), *[f"{d}=={version(d)}" for d in WHEELS]]
    print(" ".join(cmd))
    subprocess.run(cmd, check=True)
    if own:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(folder), str(REPO)],
                       check=True)
    print(f"there: python3 -m pip install -q --no-index --no-deps --target /tmp/site {folder}/*.whl "
          f"&& export PYTHONPATH=/tmp/site")


def environment(device) -> dict:
    from importlib.metadata import version  # every VERSIONS entry is in NEEDED: installed
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": str(device), "device_name": name, "gpu_count": torch.cuda.device_count(),
            "python": platform.python_version(), "versions": {d: version(d) for d in VERSIONS}}


def load_test_helper(name: str):
    """tests/sdstub.py or tests/tinyrun.py by path: the script runs from a checkout, not pytest."""
    spec = importlib.util.spec_from_file_location(f"_gpu_check_{name}", REPO / "tests" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- 1. SD v1.5-size training step ------------------------------------------------------------------
def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, n: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def reset_peak(device) -> None:
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def build_parts(small: bool, device) -> SimpleNamespace:
    """SD v1.5 shapes at random init (small: the stand-in's tiny widths), LoRA, level encoders."""
    from taxadiffusion.backbone import add_lora, build_sd15_random, noise_scheduler
    from taxadiffusion.conditioning import TaxonomyConditioner
    from taxadiffusion.config import ModelConfig
    mc = ModelConfig(base="sd15-random")
    if small:
        p = load_test_helper("sdstub").build_sd15_stub()
        unet, vae, te, res, ff = p["unet"], p["vae"], p["text_encoder"], 64, 64
    else:
        bb = build_sd15_random(mc, 512)  # on the CPU, as the code does it (seconds on 16 cores)
        unet, vae, te, res, ff = bb.unet, bb.vae, bb.text_encoder, 512, 2048
    add_lora(unet, mc)
    cond = TaxonomyConditioner(len(RANKS), te.config.hidden_size, 2, 8, ff, 0.1, True)
    # the VAE stays on the device in the mixed-precision dtype, as in training.py; the text encoder
    # has done its work once the embedding tables are cached
    return SimpleNamespace(unet=unet.to(device), vae=vae.to(device, torch.bfloat16), te=te,
                           cond=cond.to(device), res=res, sched=noise_scheduler(mc, pixel_space=False),
                           unet_params=sum(p.numel() for p in unet.parameters()))


def setup_stage(parts, stage, dtype) -> list:
    """stages.apply_stage, then training.py's dtypes: frozen base UNet in bf16, trainable in fp32."""
    from taxadiffusion.backbone import base_parameters
    from taxadiffusion.stages import apply_stage
    params = apply_stage(stage, parts.unet, parts.cond)
    for p in base_parameters(parts.unet):
        p.data = p.data.to(torch.float32 if p.requires_grad else dtype)
    return params


def make_step(parts, stage, params, batch: int, device, dtype):
    """One optimizer step of training.py on cached inputs: noise, add_noise, level dropout,
    conditioner and UNet under autocast, MSE, backward, clip, AdamW. (One process: accelerate's
    autocast, backward and clip_grad_norm_ are these torch calls.)"""
    import torch.nn.functional as F
    from taxadiffusion.conditioning import gather_embeddings, sample_keep
    gen = torch.Generator().manual_seed(0)
    D, lat, n_taxa = parts.cond.config.dim, parts.res // 8, 8
    # what the caches hand the loop: per-level text-embedding tables (fp16 on the CPU when D >= 512)
    # and latents
    tables = [torch.randn(n_taxa, 77, D).to(torch.float16 if D >= 512 else torch.float32) for _ in RANKS]
    null = torch.randn(77, D)
    x0 = torch.randn(batch, 4, lat, lat).to(device, dtype)
    ids = torch.randint(0, n_taxa, (batch, len(RANKS)), generator=gen)
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=1e-2)

    def step() -> float:
        noise = torch.randn(x0.shape, generator=gen).to(device, dtype)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
        xt = parts.sched.add_noise(x0, noise, t)
        keep = sample_keep(ids >= 0, stage.level, stage.p_uncond, stage.p_prefix, gen)
        with torch.autocast(device.type, dtype=dtype):
            emb = gather_embeddings(tables, ids).to(device, torch.float32)
            ctx = parts.cond(emb, keep.to(device), null.to(device, torch.float32))
            eps = parts.unet(xt, t, ctx.to(dtype)).sample
        loss = F.mse_loss(eps.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # the loop reads the loss every micro-batch: a sync per step there too
    return step


def bench_train(parts, device, dtype, batches, warmup: int, n: int) -> list[dict]:
    from taxadiffusion.config import TrainConfig
    from taxadiffusion.stages import plan_stages
    plan = plan_stages(TrainConfig(strategy="progressive"), RANKS)
    k = plan[-1].level
    out = []
    for stage, what in ((plan[0], "LoRA + level 0 train"),
                        (plan[-1], f"level {k} alone trains, UNet+LoRA frozen, context = levels 0..{k}")):
        params = setup_stage(parts, stage, dtype)
        for b in batches:
            rec = {"stage": stage.name, "what": what, "batch": b, "resolution": parts.res,
                   "latents": [4, parts.res // 8, parts.res // 8], "dtype": DTYPE_NAME,
                   "trainable_params": sum(p.numel() for p in params), "warmup": warmup, "steps": n}
            try:
                reset_peak(device)
                ts = timed(make_step(parts, stage, params, b, device, dtype), device, warmup, n)
                med = statistics.median(ts)
                rec.update(step_s_median=med, step_s_all=ts, images_per_s=b / med,
                           peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30
                           if device.type == "cuda" else None)
            except Exception as e:  # noqa: BLE001 - an OOM at batch 12 is a result, not a crash
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            out.append(rec)
            print(f"  train {stage.name} batch {b}: {rec.get('step_s_median', rec.get('error'))}")
    return out


def bench_vae(parts, device, dtype, batch: int, warmup: int, n: int) -> dict:
    """training._to_model_space on the uncached path: encode a pixel batch, draw the posterior from
    a CPU generator, scale."""
    x = torch.rand(batch, 3, parts.res, parts.res, device=device, dtype=dtype) * 2 - 1
    gen = torch.Generator().manual_seed(0)

    def enc():
        with torch.no_grad():
            dist = parts.vae.encode(x).latent_dist
            eps = torch.randn(dist.mean.shape, generator=gen).to(dist.mean)
            return (dist.mean + dist.std * eps) * parts.vae.config.scaling_factor
    ts = timed(enc, device, warmup, n)
    return {"batch": batch, "resolution": parts.res, "dtype": DTYPE_NAME, "warmup": warmup, "steps": n,
            "batch_s_median": statistics.median(ts), "s_per_image_median": statistics.median(ts) / batch,
            "batch_s_all": ts}


# -- 2. sampling ---------------------------------------------------------------------------------------
def bench_sampling(parts, device, dtype, steps: list[int], n_images: int, budget_s: float) -> list[dict]:
    """TaxaGuide with the preset's scheduler and scale. t(n) = a + b n, fitted from a short run and
    the first requested one, extrapolates a later run whose estimate exceeds the budget."""
    from taxadiffusion.backbone import clip_tokenizer
    from taxadiffusion.config import load_config
    from taxadiffusion.pipeline import TaxaDiffusionPipeline, make_scheduler
    from taxadiffusion.taxonomy import Taxonomy
    sc = load_config("sd15-fishnet").sample
    tax = Taxonomy(RANKS, [("Actinopterygii", "Perciformes", "Chaetodontidae", "Chaetodon", "auriga"),
                           ("Actinopterygii", "Perciformes", "Pomacentridae", "Amphiprion", "ocellaris")])
    parts.unet.eval()
    parts.cond.eval()
    pipe = TaxaDiffusionPipeline(parts.unet, make_scheduler(sc.scheduler, parts.sched.config),
                                 parts.te, clip_tokenizer(), parts.cond, parts.vae, tax)
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    calls = []

    def run(n: int) -> float:
        sync(device)
        t = time.perf_counter()
        pipe("Chaetodon auriga", num_images=n_images, guidance=sc.guidance, guidance_scale=sc.scale,
             num_inference_steps=n, seed=0, output_type="uint8", progress=False,
             callback_on_step_end=lambda *a: calls.append(1))
        sync(device)
        return time.perf_counter() - t
    run(2)  # warm-up: kernels, cuDNN's choices
    short = max(1, steps[0] // 5)
    pts, out = {short: run(short)}, []
    for n in steps:
        rec = {"steps": n, "images": n_images, "scheduler": sc.scheduler, "guidance": sc.guidance,
               "scale": sc.scale, "unet_batch": 2 * n_images, "dtype": DTYPE_NAME, "resolution": parts.res}
        est = None
        if steps[0] in pts:
            est = pts[steps[0]] + (pts[steps[0]] - pts[short]) / (steps[0] - short) * (n - steps[0])
        if est is not None and est > budget_s:
            rec.update(seconds=est, measured=False, note=f"extrapolated linearly from {short} and "
                       f"{steps[0]} steps (estimate {est:.0f} s > --sample-budget {budget_s:.0f} s)")
        else:
            calls.clear()
            pts[n] = run(n)
            rec.update(seconds=pts[n], measured=True, unet_calls=len(calls))
        rec["s_per_image"] = rec["seconds"] / n_images
        out.append(rec)
        print(f"  sample {n} steps: {rec['seconds']:.3f} s" + ("" if rec["measured"] else " (extrapolated)"))
    return out


def benchmarks(a, device) -> dict:
    dtype = torch.bfloat16
    torch.manual_seed(0)
    parts = build_parts(a.small, device)
    warm, n = (1, 2) if a.small else (3, 10)
    out = {"unet_params": parts.unet_params,
           "train": bench_train(parts, device, dtype, (1, 2) if a.small else (1, 12), warm, n),
           "vae_encode": bench_vae(parts, device, dtype, 2 if a.small else 12, warm, n),
           "sampling": bench_sampling(parts, device, dtype, [2, 4] if a.small else [25, 250],
                                      2 if a.small else 4, a.sample_budget)}
    del parts
    reset_peak(device)  # the code paths share the GPU next
    return out


# -- 3. code paths through the CLI -------------------------------------------------------------------
TRAIN_PATHS = {  # path -> overrides on top of the stand-in's training command
    "train-progressive-cache": [], "train-progressive-nocache": ["data.cache_latents=false"],
    "train-all": ["train.strategy=all"], "train-random": ["train.strategy=random"],
    "train-lora-text": ["train.strategy=lora-text"], "train-full": ["train.strategy=full"],
    "train-bf16": ["train.mixed_precision=bf16"],
    "train-grad-accum-2": ["train.gradient_accumulation_steps=2"],
    "train-grad-checkpointing": ["train.gradient_checkpointing=true"],
}
AFTER = ("sample", "export", "evaluate-judge")  # on the progressive run, once training is done
PATHS = [*TRAIN_PATHS, "train-kill-resume", "train-2-processes", *AFTER, "report"]
# a CPU minute holds 4 CLI runs (each imports torch + diffusers, ~10 s); tests/test_resume.py kills
SMALL_PATHS = ["train-progressive-cache", "sample", "export", "report"]


def tail(text: str | None, n: int = 8) -> str:
    """The last n lines that are not progress bars."""
    lines = [l for l in (text or "").replace("\r", "\n").splitlines()
             if l.strip() and not ("%|" in l and "/s" in l)]
    return "\n".join(lines[-n:])


class Paths:
    """The stand-in, its images, and the CLI runs on them, each in its own subprocess."""

    def __init__(self, tmp: Path, device, small: bool, timeout: float, threads: int):
        self.tmp, self.device, self.small, self.timeout = tmp, device, small, timeout
        self.sd = load_test_helper("sdstub").write_sd15_stub(tmp / "sd", "bpe")
        self.images = load_test_helper("tinyrun").write_images(tmp / "images", size=64)
        import taxadiffusion
        src = str(Path(taxadiffusion.__file__).parents[1])  # the children import what we imported
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads),
                    "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
        if device.type == "cpu":  # accelerate would otherwise put the train paths on a GPU
            self.env["CUDA_VISIBLE_DEVICES"] = ""

    def train_argv(self, name: str, extra: list[str]) -> list[str]:
        # small: the fewest steps that still checkpoint, and no validation grids (25 steps a row)
        short = ["train.steps_stage0=2", "train.steps_per_stage=1", "train.validation_seeds=0"] \
            if self.small else []
        return ["train", "--config", "sd15-fishnet", "model.base=sd15", f"model.pretrained={self.sd}",
                "data.format=csv", f"data.root={self.images}", "data.ranks=[class,family,genus,species]",
                "data.resolution=64", "model.level_ff=64", "train.batch_size=2", "train.steps_stage0=4",
                "train.steps_per_stage=2", "train.checkpoint_every=2", "train.log_every=1",
                "train.validate_every=2", "train.validation_seeds=2", "train.fixed_batch=4",
                f"train.output_dir={self.tmp / 'runs'}", f"name={name}", "data.num_workers=0",
                "data.cache_latents=true", *short, *extra]

    def cli(self, path: str, argv: list[str], cache: str, launcher: tuple = ()) -> dict:
        t = time.perf_counter()
        env = {**self.env, "TAXADIFFUSION_CACHE": str(self.tmp / "cache" / cache)}
        try:
            r = subprocess.run([sys.executable, *launcher, "-m", "taxadiffusion.cli", *argv], env=env,
                               capture_output=True, text=True, timeout=self.timeout)
            rc, err = r.returncode, r.stderr
        except subprocess.TimeoutExpired as e:
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
            rc, err = "timeout", f"{err or ''}\n(killed after {self.timeout:.0f} s)"
        rec = {"path": path, "status": "pass" if rc == 0 else "fail", "rc": rc,
               "seconds": time.perf_counter() - t, "argv": [*launcher, *argv]}
        return rec if rc == 0 else {**rec, "stderr_tail": tail(err)}

    def kill_resume(self) -> dict:
        """SIGKILL once stage 0 has written step-2, then --resume latest to the end of the last stage."""
        path, t0 = "train-kill-resume", time.perf_counter()
        argv = self.train_argv(path, ["train.steps_stage0=40", "train.validate_every=0"])
        run = self.tmp / "runs" / path
        mark = run / "checkpoints" / "stage-0-class" / "step-2" / "state.json"
        env = {**self.env, "TAXADIFFUSION_CACHE": str(self.tmp / "cache" / path)}
        with open(self.tmp / f"{path}.stderr", "w+") as err:
            p = subprocess.Popen([sys.executable, "-m", "taxadiffusion.cli", *argv], env=env,
                                 stdout=subprocess.DEVNULL, stderr=err)
            while not mark.exists() and p.poll() is None and time.perf_counter() - t0 < self.timeout:
                time.sleep(0.01)
            alive = p.poll() is None
            if alive:
                p.send_signal(signal.SIGKILL)
            p.wait()
            err.seek(0)
            first = err.read()
        if not alive or (run / "checkpoints" / "stage-0-class" / "final").exists():
            return {"path": path, "status": "fail", "seconds": time.perf_counter() - t0, "argv": argv,
                    "stderr_tail": tail(first) + "\n(the first run was not killed mid-stage)"}
        rec = self.cli(path, [*argv, "--resume", "latest"], path)
        log = (run / "log.txt").read_text() if (run / "log.txt").exists() else ""
        done = list((run / "checkpoints").glob("stage-3-*/final/state.json"))
        if rec["status"] == "pass" and not (done and "resuming from" in log):
            rec.update(status="fail", stderr_tail="exit 0, but no 'resuming from' or no stage-3 final")
        return {**rec, "seconds": time.perf_counter() - t0}

    def two_processes(self) -> dict:
        if self.device.type != "cuda" or torch.cuda.device_count() < 2:
            return {"path": "train-2-processes", "status": "skipped", "why": "needs 2 GPUs"}
        launch = ("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2")
        rec = self.cli("train-2-processes", self.train_argv("train-2-processes", []), "2p", launch)
        return self.check_ranks(rec)

    def check_ranks(self, rec: dict) -> dict:
        """Both ranks must have trained (training._rank_record), not one process twice or alone."""
        ranks = self.tmp / "runs" / rec["path"] / "ranks"
        if rec["status"] == "pass" and not list(ranks.glob("*-rank1.json")):
            rec.update(status="fail", stderr_tail=f"exit 0, but {ranks} has no rank-1 record")
        return rec

    def after_training(self, path: str) -> dict:
        run, dev, steps = str(self.tmp / "runs" / "train-progressive-cache"), self.device.type, \
            "2" if self.small else "25"
        argv = {"sample": ["sample", run, "--taxon", "Corvus corax", "--n", "2", "--steps", steps,
                           "--device", dev],
                "export": ["export", run, str(self.tmp / "export"), "--sample-steps", steps,
                           "--sample-images", "1" if self.small else "2", "--device", dev],
                "evaluate-judge": ["evaluate", run, "--metrics", "judge", "--n-per-taxon", "2",
                                   "--steps", steps, "--device", dev],
                "report": ["report", run]}[path]
        rec = self.cli(path, argv, "train-progressive-cache")
        if path == "export" and "invalid choice: 'export'" in rec.get("stderr_tail", ""):
            rec["status"] = "absent"  # the subcommand is not in this checkout (yet)
        return rec

    def run_all(self, which: list[str], jobs: int) -> list[dict]:
        """Training runs in parallel, then sample/export/evaluate, then report (it reads the others)."""
        work = {**{p: (lambda p=p: self.cli(p, self.train_argv(p, TRAIN_PATHS[p]), p)) for p in TRAIN_PATHS},
                "train-kill-resume": self.kill_resume, "train-2-processes": self.two_processes}
        res = {}
        with ThreadPoolExecutor(jobs) as pool:
            for group in (work, {p: (lambda p=p: self.after_training(p)) for p in AFTER}):
                futures = {p: pool.submit(f) for p, f in group.items() if p in which}
                res.update({p: f.result() for p, f in futures.items()})
        if "report" in which:
            res["report"] = self.after_training("report")
        why = "not in --paths" + (" (--small's default: a CPU minute's worth)" if self.small else "")
        return [res.get(p) or {"path": p, "status": "skipped", "why": why} for p in PATHS]


# -- 4. output and main ------------------------------------------------------------------------------
def fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(res: dict) -> None:
    env = res["environment"]
    print(f"\n== gpu_check on {env['device_name']} ({env['device']}); "
          + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + f"; {res['wall_s']:.0f} s")
    print(f"\n{'training step (bf16, cached inputs)':36} {'batch':>5} {'median s':>9} {'img/s':>7} "
          f"{'peak GiB':>9} {'trainable':>11}")
    for r in res["train"]:
        print(f"{r['stage']:36} {r['batch']:>5} {fmt(r.get('step_s_median')):>9} "
              f"{fmt(r.get('images_per_s'), '.1f'):>7} {fmt(r.get('peak_mem_gib'), '.2f'):>9} "
              f"{r['trainable_params']:>11,}" + (f"  ERROR {r['error']}" if "error" in r else ""))
    if res["vae_encode"]:
        v = res["vae_encode"]
        print(f"\nVAE encode: {v['s_per_image_median']:.4f} s/image (median, batch {v['batch']}, "
              f"{v['resolution']} px)")
    print(f"\n{'sampling (TaxaGuide, batched)':30} {'steps':>6} {'images':>6} {'seconds':>9} {'s/image':>8}")
    for r in res["sampling"]:
        print(f"{r['scheduler'] + ' scale ' + str(r['scale']):30} {r['steps']:>6} {r['images']:>6} "
              f"{r['seconds']:>9.3f} {r['s_per_image']:>8.3f}  {'measured' if r['measured'] else r['note']}")
    print(f"\n{'code path':28} {'status':8} {'seconds':>8}")
    for r in res["code_paths"]:
        print(f"{r['path']:28} {r['status']:8} {fmt(r.get('seconds'), '.1f'):>8}  {r.get('why', '')}")
        if r.get("stderr_tail"):
            print("    | " + r["stderr_tail"].replace("\n", "\n    | "))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_check.json"))
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--small", action="store_true", help="tiny widths, 64 px, 1-2 steps (CPU, tests)")
    p.add_argument("--paths", default=None, help=f"'all' or a comma list of {', '.join(PATHS)} "
                   f"(default: all; --small: {','.join(SMALL_PATHS)})")
    p.add_argument("--skip-bench", action="store_true", help="code paths only")
    p.add_argument("--jobs", type=int, default=None, help="CLI runs at once (default: cuda 4, cpu 1)")
    p.add_argument("--path-timeout", type=float, default=240.0, help="seconds per CLI run")
    p.add_argument("--sample-budget", type=float, default=60.0,
                   help="seconds a sampling run may take; beyond that it is extrapolated")
    p.add_argument("--wheels", default=None, metavar="DIR",
                   help="download the wheels the GPU machine lacks into DIR (needs PyPI) and exit")
    p.add_argument("--own-wheel", action="store_true", help="with --wheels: build taxadiffusion's too")
    return p.parse_args(argv)


def main(argv=None) -> int:
    global torch
    a = parse_args(argv)
    if a.wheels:
        fetch_wheels(Path(a.wheels), a.own_wheel)
        return 0
    t0 = time.perf_counter()
    miss = missing_modules()  # first: a missing wheel is named here, not by a traceback later
    if miss:
        print("missing on this machine:\n  " + "\n  ".join(f"{m}: {d}" for m, d in miss.items())
              + "\ncarry wheels: see this script's docstring (`--wheels DIR` where PyPI is reachable)")
        return 3
    src = use_checkout_src()
    import torch
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    res = {"environment": {**environment(device), "taxadiffusion_from": src},
           "settings": {"small": a.small, "dtype": DTYPE_NAME, "inputs": "precomputed latents and "
                        "text-embedding tables (the training loop's caches)",
                        "timing": "median over steps after warm-up; torch.cuda.synchronize around each",
                        "memory": "torch.cuda.max_memory_allocated since a reset before each setting"}}
    res.update({"train": [], "vae_encode": {}, "sampling": []} if a.skip_bench else benchmarks(a, device))
    which = PATHS if a.paths == "all" or (a.paths is None and not a.small) else \
        a.paths.split(",") if a.paths else SMALL_PATHS
    jobs = a.jobs or (4 if device.type == "cuda" else 1)
    threads = max(1, (os.cpu_count() or 1) // jobs) if device.type == "cuda" else 1
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        res["code_paths"] = Paths(Path(tmp), device, a.small, a.path_timeout, threads).run_all(which, jobs)
    res["code_path_counts"] = {k: sum(r["status"] == k for r in res["code_paths"])
                               for k in ("pass", "fail", "absent", "skipped")}
    res["wall_s"] = time.perf_counter() - t0
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print_table(res)
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
