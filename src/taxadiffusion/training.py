"""The training loop, top to bottom (paper Sec. 3.3, Table S1; DESIGN.md).

`train(cfg)` runs the stages of the plan (stages.py) one after another on accelerate: devices,
mixed precision (trainable parameters stay fp32), gradient accumulation, DDP across processes and
nodes, sharding by global rank, trackers (tensorboard, wandb). Everything a step needs is cached up front: text embeddings of every taxon prompt
(the text encoder never runs in the loop) and, optionally, every image's latent (or pixels).
Resuming (`resume="latest"`) restores weights, optimizer, EMA, RNG and the position in the data stream,
so a killed run continues exactly as if it had not stopped, every rank with its own random state
(tests/test_resume.py, tests/test_sd_path.py).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .backbone import (add_lora, base_parameters, build_backbone, cache_root, min_snr_weight,
                       module_fingerprint)
from .checkpoint import (list_checkpoints, load_model_state, load_training_state, rng_state,
                         save_checkpoint)
from .resume import (check_resumable, data_fingerprint, find_resume_point, prune_metrics, read_state,
                     run_lock)
from .conditioning import (TaxonomyConditioner, TextEmbeddingCache, embedding_dtype, gather_embeddings,
                           sample_keep)
from .config import Config, save_config
from .data_stream import StreamSampler, cache_model_inputs
from .stages import apply_stage, plan_stages, select_stages


def train(cfg: Config, resume: str | None = None, resume_anyway: bool = False) -> Path:
    """Train the stages of `cfg`'s plan; `resume`: "latest" or a checkpoint folder (resume.py);
    `resume_anyway`: continue even where the checkpoint's config or data differ (named in the log).
    One process trains in a run folder at a time (its main process holds the folder's lock)."""
    run = Path(cfg.train.output_dir) / cfg.name
    with run_lock(run, enabled=os.environ.get("RANK", "0") == "0"):
        return _train(cfg, run, resume, resume_anyway)


def _train(cfg: Config, run: Path, resume: str | None, resume_anyway: bool) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, gather_object, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from .datasets import read_table
    from .datasets.images import SpeciesImageDataset
    tc, mc = cfg.train, cfg.model

    # -- run folder, accelerator, seed ---------------------------------------------------------------
    if tc.report_to not in TRACKERS:
        raise ValueError(f"train.report_to must be one of {', '.join(TRACKERS)}, got {tc.report_to!r}")
    # several processes and no GPU (torchrun or `accelerate launch --cpu`): accelerate only builds a
    # gloo process group when told the run is on the CPU
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    # mixed_precision None: accelerate reads the launcher's setting (ACCELERATE_MIXED_PRECISION)
    acc = Accelerator(mixed_precision=tc.mixed_precision,
                      log_with=None if tc.report_to == "none" else tc.report_to,
                      project_config=ProjectConfiguration(project_dir=run, logging_dir=run / "logs"),
                      gradient_accumulation_steps=tc.gradient_accumulation_steps, cpu=multi_cpu)
    main, rank, world = acc.is_main_process, acc.process_index, acc.num_processes
    set_seed(tc.seed)  # same initial weights on every rank
    if main:
        run.mkdir(parents=True, exist_ok=True)
    log = _Logger(run, main, acc)
    log(f"accelerate: {world} process(es) on {acc.device}, mixed precision {acc.mixed_precision}")
    if tc.report_to != "none":
        acc.init_trackers(cfg.name, config=_flat_config(cfg))

    # -- data: validated table, taxonomy ---------------------------------------------------------------
    table = read_table(cfg.data.format, cfg.data.metadata, cfg.data.root, ranks=cfg.data.ranks,
                       missing=cfg.data.missing_ranks, strict=cfg.data.strict)
    taxonomy = table.taxonomy(cfg.data.species_prompt)
    data_fp = data_fingerprint(table, taxonomy)
    log(f"data: {len(table.records)} images, " + ", ".join(f"{r} {n}" for r, n in taxonomy.summary().items())
        + (f"; rows dropped: {dict(table.report.dropped)}" if table.report.rows_dropped else ""))
    L = taxonomy.num_levels
    res = cfg.data.resolution

    # -- model: backbone, LoRA, conditioner ------------------------------------------------------------
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
    bb = build_backbone(mc, res, seed=tc.seed)
    unet, device = bb.unet, acc.device
    plan = plan_stages(tc, taxonomy.ranks)
    stages = select_stages(plan, tc.stages)
    if any(s.train_lora for s in plan):
        add_lora(unet, mc)
    text_mode = plan[0].text_prompt
    conditioner = None if text_mode else TaxonomyConditioner(
        L, bb.context_dim, mc.level_layers, mc.level_heads, mc.level_ff, mc.level_dropout, mc.zero_init,
        mc.level_out_proj)
    if tc.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    bb.text_encoder.to(device)
    if bb.vae is not None:
        bb.vae.to(device, weight_dtype)

    # -- text embeddings of every prompt, cached ---------------------------------------------------------
    cache = TextEmbeddingCache(bb.text_encoder, bb.tokenizer, module_fingerprint(bb.text_encoder),
                               cache_root() / "text-embeddings",
                               embedding_dtype(bb.context_dim))
    if text_mode:  # flat baselines: one prompt per taxon, the lineage as text
        tables = [cache.encode([taxonomy.lineage_text(t) for t in taxonomy.vocab(l)]) for l in range(L)]
    else:
        tables = cache.level_tables(taxonomy)
    null = cache.encode([""])[0]
    log(f"text embeddings: {sum(len(t) for t in tables)} prompts cached ({cache.encoder_calls} encoded now)")
    bb.text_encoder.to("cpu")  # not needed again in the loop

    # -- where to start: a fresh run or the latest checkpoint ----------------------------------------------
    # (checked before anything is written: a refused resume leaves the run folder as it was)
    start_stage, start_ckpt = stages[0].index, None
    if resume:
        start_ckpt, st = find_resume_point(run, resume)
        if start_ckpt is None:
            log(f"--resume {resume}: {run} has no checkpoint yet; starting from the beginning")
        else:
            check_resumable(start_ckpt, st, cfg.to_dict(), data_fp, len(plan), resume_anyway, log)
            load_model_state(start_ckpt, unet, conditioner)
            start_stage = st["stage_index"] + (1 if st.get("complete") else 0)
            log(f"resuming from {start_ckpt} (stage {st['stage_index']}, step {st['step']})")
            if main:
                n = prune_metrics(run, {s.name: s.index for s in plan}, st["stage_index"],
                                  st["step"] if not st.get("complete") else 10**12)
                if n:
                    log(f"metrics.jsonl: {n} record(s) logged after that checkpoint dropped")
            if st.get("complete"):
                start_ckpt = None
            if start_stage > stages[-1].index:
                log(f"every selected stage is complete in {run}; nothing to train")
    elif tc.stages != "all" and stages[0].index > 0:
        prev = [c for c in list_checkpoints(run) if c[0] == stages[0].index - 1]
        if not prev:
            raise FileNotFoundError(f"stage {stages[0].index} starts from stage {stages[0].index - 1}, "
                                    f"but {run}/checkpoints has no checkpoint of it")
        check_resumable(prev[-1][2], read_state(prev[-1][2]), cfg.to_dict(), data_fp, len(plan),
                        resume_anyway, log)
        load_model_state(prev[-1][2], unet, conditioner)
    # -- inputs: every image's latent (or pixels) cached by all ranks, or decoded every step ------------
    dataset = SpeciesImageDataset(table, taxonomy, res, train=True, seed=tc.seed)
    ids_all, inputs = dataset.ids, None
    if cfg.data.cache_latents:
        cache_dir = cfg.data.cache_dir
        # a folder named in the config may hold another run's cache: refused, not overwritten
        inputs = cache_model_inputs(table, bb, res, device, acc, Path(cache_dir) if cache_dir else run / "latents",
                                    margin=cfg.data.cache_margin, flip=cfg.data.cache_flip,
                                    on_mismatch="error" if cache_dir else "rebuild",
                                    num_workers=cfg.data.num_workers, log=log)
        log(f"input cache {inputs.dir}: {len(inputs)} records ({inputs.stats['encoded']} encoded now by "
            f"rank 0), {inputs.slack + 1}x{inputs.slack + 1} window offsets, {inputs.views} view(s)")
        bad = [table.records[i].path for i in inputs.bad.nonzero().squeeze(1).tolist()]
        if bad:
            ids_all = ids_all.clone()
            ids_all[inputs.bad] = -1
            log(f"images: {len(bad)} unreadable, excluded and counted: " + ", ".join(bad[:5]))
    # one held-out-noise batch for the whole run, so its loss is comparable across stages: a
    # zero-init stage k starts exactly where stage k-1 ended (records lacking a level use their
    # shorter lineage there)
    valid = (ids_all[:, 0] >= 0).nonzero().squeeze(1)
    fixed = _fixed_batch(valid, inputs, dataset, ids_all, bb, tc.seed, tc.fixed_batch) \
        if tc.fixed_batch > 0 else None
    if main:  # the config and taxonomy that describe the weights this run now trains
        save_config(cfg, run / "config.yaml")
        taxonomy.save(run / "taxonomy.json")
    unet.to(device)
    if conditioner is not None:
        conditioner.to(device)

    # -- stages ----------------------------------------------------------------------------------------
    for stage in stages:
        if stage.index < start_stage:
            continue
        params = apply_stage(stage, unet, conditioner)
        # trainable parameters in fp32; the frozen base UNet in the mixed-precision dtype (as
        # diffusers' LoRA scripts). LoRA and level encoders stay fp32 so checkpoints are lossless.
        for p in base_parameters(unet):
            p.data = p.data.to(torch.float32 if p.requires_grad else weight_dtype)
        # records that have the stage's level (missing_ranks=keep leaves some shorter; unreadable
        # images have no level at all)
        has = (ids_all[:, stage.data_level] >= 0).nonzero().squeeze(1)
        if len(has) < len(ids_all):
            log(f"{stage.name}: {len(ids_all) - len(has)} images lack {taxonomy.ranks[stage.data_level]}; "
                f"this stage trains on {len(has)}")
        optimizer = torch.optim.AdamW(params, lr=stage.lr, betas=(tc.adam_beta1, tc.adam_beta2),
                                      weight_decay=tc.adam_weight_decay, eps=tc.adam_epsilon)
        lr_sched = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=tc.lr_warmup_steps)
        ema = EMAModel(params, decay=tc.ema_decay, use_ema_warmup=True, power=3 / 4) \
            if tc.ema_decay > 0 else None
        gen = torch.Generator().manual_seed(tc.seed * 1000 + stage.index * 10 + rank)
        step = 0
        if start_ckpt is not None and stage.index == start_stage:
            step = load_training_state(start_ckpt, optimizer, ema, lr_sched, gen, rank=rank,
                                       scaler=acc.scaler)["step"]
            start_ckpt = None
        train_mods = [m for m in (unet, conditioner) if m is not None and
                      any(p.requires_grad for p in m.parameters())]
        wrapped = acc.prepare(*train_mods, optimizer)
        *wrapped_mods, opt = wrapped if isinstance(wrapped, (list, tuple)) else [wrapped]
        run_unet = wrapped_mods[train_mods.index(unet)] if unet in train_mods else unet
        run_cond = (wrapped_mods[train_mods.index(conditioner)]
                    if conditioner in train_mods else conditioner)
        accum = tc.gradient_accumulation_steps
        sampler = StreamSampler(len(has), tc.batch_size, rank, world, seed=tc.seed + stage.index,
                                start=step * accum)
        batches = _batches(sampler, has, inputs, dataset, ids_all, cfg.data.num_workers, tc.seed)
        stage_dir = run / "checkpoints" / stage.name

        def ckpt(name: str, complete: bool = False) -> None:
            acc.wait_for_everyone()
            rngs = gather_object([rng_state(gen)])  # every rank's own state, in rank order
            if main:
                save_checkpoint(stage_dir / name, cfg=cfg, taxonomy=taxonomy, unet=acc.unwrap_model(run_unet),
                                conditioner=conditioner, backbone=bb,
                                save_unet=any(s.train_unet for s in plan),
                                state={"stage_index": stage.index, "stage": stage.name, "step": step,
                                       "complete": complete, "fixed_loss": log.last_fixed,
                                       "data_fingerprint": data_fp},
                                optimizer=None if complete else opt.optimizer,
                                ema=None if complete else ema,
                                lr_scheduler=lr_sched, rng_states=rngs, scaler=acc.scaler)
                _prune(stage_dir, tc.keep_checkpoints)
            acc.wait_for_everyone()

        def fixed_loss() -> None:
            if fixed is None:
                return
            with _ema_weights(ema, params):
                loss = _eval_loss(fixed, unet, conditioner, tables, null, bb, stage, device, weight_dtype)
            log.fixed(stage.name, step, loss)

        if step == 0:  # a resumed stage logged its start already
            fixed_loss()
        bar = tqdm(total=stage.steps, initial=step, desc=stage.name, disable=not main, dynamic_ncols=True)
        window, durations, seen = [], [], 0
        while step < stage.steps:
            t_step = time.perf_counter()
            # -- one optimizer step: `accum` micro-batches -----------------------------------------
            for _ in range(accum):
                x0, ids = next(batches)
                x0 = _to_model_space(x0.to(device), bb, weight_dtype, inputs is not None, gen)
                noise = torch.randn(x0.shape, generator=gen).to(device, weight_dtype)
                t = torch.randint(0, bb.noise_scheduler.config.num_train_timesteps, (len(ids),),
                                  generator=gen).to(device)
                xt = bb.noise_scheduler.add_noise(x0, noise, t)
                k = int(torch.randint(0, L, (1,), generator=gen)) if stage.random_level else stage.level
                keep = sample_keep(ids >= 0, k, stage.p_uncond, stage.p_prefix, gen)
                with acc.accumulate(*wrapped_mods):
                    with acc.autocast():
                        ctx = _context(ids, keep, tables, null, run_cond, stage, device)
                        eps = run_unet(xt, t, ctx.to(weight_dtype)).sample
                    loss = F.mse_loss(eps.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
                    loss = (loss * min_snr_weight(bb.noise_scheduler, t, tc.snr_gamma)).mean()
                    acc.backward(loss)
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(params, tc.max_grad_norm)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                window.append(loss.detach().item())
                seen += len(ids) * world
            step += 1
            lr_sched.step()
            if ema is not None:
                ema.step(params)
            durations.append(time.perf_counter() - t_step)
            bar.update(1)
            # -- log, checkpoint, validate -------------------------------------------------------------
            if step % tc.log_every == 0 or step == stage.steps:
                med = sorted(durations)[len(durations) // 2]
                ips = seen / sum(durations)
                rec = {"stage": stage.name, "step": step, "loss": sum(window) / len(window),
                       "lr": lr_sched.get_last_lr()[0], "images_per_s": ips, "step_s_median": med}
                if conditioner is not None:  # a level stuck near 0 is switched off (README)
                    rec["level_gains"] = [round(g, 5) for g in conditioner.output_gains()]
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.1e}", img_s=f"{ips:.1f}")
                log.metrics(rec, acc)
                window, durations, seen = [], [], 0
            if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < stage.steps:
                ckpt(f"step-{step}")
            if tc.validate_every and step % tc.validate_every == 0 and step < stage.steps:
                fixed_loss()
                if main and tc.validation_seeds > 0:
                    with _ema_weights(ema, params):
                        _validation_grid(run, stage, step, cfg, bb, unet, conditioner, taxonomy, log, acc)
        bar.close()
        # -- stage end: EMA weights become the stage's result; the next stage builds on them ------------
        if ema is not None:
            ema.copy_to(params)
        fixed_loss()
        _rank_record(run, stage, rank, params, sampler)
        ckpt("final", complete=True)
        if main and tc.validation_seeds > 0:
            _validation_grid(run, stage, step, cfg, bb, unet, conditioner, taxonomy, log, acc)
        acc.free_memory()
    acc.end_training()
    return run


# -- helpers of the loop -------------------------------------------------------------------------------
TRACKERS = ("tensorboard", "wandb", "none")


def _flat_config(cfg: Config) -> dict:
    """The run config as tracker hyperparameters: one level of dotted keys, scalar values only
    (tensorboard's hparams take no lists or None)."""
    out = {}
    for sec, d in cfg.to_dict().items():
        for k, v in (d.items() if isinstance(d, dict) else [("", d)]):
            key = f"{sec}.{k}" if k else sec
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class _Logger:
    """log.txt and metrics.jsonl on the main process; tensorboard through accelerate."""

    def __init__(self, run: Path, main: bool, acc=None):
        self.run, self.main, self.last_fixed, self.acc = run, main, None, acc

    def __call__(self, msg: str) -> None:
        if self.main:
            tqdm.write(msg)
            with open(self.run / "log.txt", "a") as f:
                f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n")

    def metrics(self, rec: dict, acc) -> None:
        if self.main:
            rec = {**rec, "time": time.time()}
            with open(self.run / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            scalars = {f"{rec['stage']}/{k}": v for k, v in rec.items()
                       if isinstance(v, (int, float)) and k not in ("step", "time")}
            for l, g in enumerate(rec.get("level_gains", [])):
                scalars[f"{rec['stage']}/level_gain/{l}"] = g
            acc.log(scalars, step=rec["step"])

    def fixed(self, stage: str, step: int, loss: float) -> None:
        """Loss on a fixed batch with fixed noise and timesteps: comparable across steps."""
        self.last_fixed = loss
        if self.main:
            with open(self.run / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"stage": stage, "step": step, "fixed_loss": loss,
                                    "time": time.time()}) + "\n")
            self(f"{stage} step {step}: fixed-batch loss {loss:.5f}")
            if self.acc is not None:
                self.acc.log({f"{stage}/fixed_loss": loss}, step=step)


def _batches(sampler, has, inputs, dataset, ids_all, num_workers: int, seed: int):
    """(x, ids) micro-batches in stream order: from the input cache (each record's seeded window and
    view of the batch's epoch: random crops and flips in latent space), or decoded by DataLoader
    workers (the batch sampler is the deterministic stream, so resuming replays the same batches)."""
    if inputs is not None:
        for pos in sampler:
            idx = has[pos]
            yield inputs.batch(idx.tolist(), sampler.epoch_of(sampler.step - 1), seed), ids_all[idx]
        return
    from torch.utils.data import DataLoader

    class _Positions:  # the stream, mapped to record indices, with the epoch for random crops
        def __iter__(self):
            for pos in sampler:
                e = sampler.epoch_of(sampler.step - 1)
                yield [(int(i), e) for i in has[pos]]

    # its own generator: creating an iterator draws the workers' base seed, which must not come
    # from the global RNG (dropout draws from that one, restored exactly on resume)
    loader = DataLoader(dataset, batch_sampler=_Positions(), num_workers=num_workers,
                        persistent_workers=num_workers > 0,
                        generator=torch.Generator().manual_seed(sampler.seed))
    for b in loader:
        yield b["pixels"], b["ids"]


def _to_model_space(x: torch.Tensor, bb, dtype: torch.dtype, cached: bool,
                    generator: torch.Generator) -> torch.Tensor:
    """Cached inputs (latents; pixels without a VAE) as they are; else pixels through the VAE, its
    posterior sampled from `generator` (never the global RNG, which DataLoader iterators also draw from: resuming replays
    the generator exactly)."""
    if cached or bb.vae is None:
        return x.to(dtype)
    with torch.no_grad():
        dist = bb.vae.encode(x.to(bb.vae.device, bb.vae.dtype)).latent_dist
        eps = torch.randn(dist.mean.shape, generator=generator).to(dist.mean)
        lat = dist.mean + dist.std * eps
    return (lat * bb.vae.config.scaling_factor).to(dtype)


def _fixed_batch(has, inputs, dataset, ids_all, bb, seed: int, n: int = 64) -> dict:
    g = torch.Generator().manual_seed(seed + 7)
    idx = has[torch.randperm(len(has), generator=g)[:n]]
    if inputs is not None:  # epoch 0's windows, as the uncached path's epoch-0 crops
        x = inputs.batch(idx.tolist(), 0, seed).float()
    else:
        x = _to_model_space(torch.stack([dataset[(int(i), 0)]["pixels"] for i in idx]), bb,
                            torch.float32, False, g).float().cpu()
    noise = torch.randn(x.shape, generator=g)
    t = torch.randint(0, bb.noise_scheduler.config.num_train_timesteps, (len(idx),), generator=g)
    return {"x": x, "ids": ids_all[idx], "noise": noise, "t": t}


def _context(ids, keep, tables, null, conditioner, stage, device) -> torch.Tensor:
    if stage.text_prompt:  # flat baselines: the deepest kept level's lineage text (or null)
        depth = keep.sum(1) - 1
        rows = [tables[d][ids[i, d]] if d >= 0 else null for i, d in enumerate(depth.tolist())]
        return torch.stack(rows).to(device).float()
    emb = gather_embeddings(tables, ids).to(device, torch.float32)
    return conditioner(emb, keep.to(device), null.to(device, torch.float32))


@torch.no_grad()
def _eval_loss(fixed, unet, conditioner, tables, null, bb, stage, device, dtype) -> float:
    with _eval_mode(unet, conditioner):
        return _fixed_loss(fixed, unet, conditioner, tables, null, bb, stage, device, dtype)


def _fixed_loss(fixed, unet, conditioner, tables, null, bb, stage, device, dtype) -> float:
    L = fixed["ids"].shape[1]
    k = L - 1 if stage.random_level else stage.level
    keep = (fixed["ids"] >= 0) & (torch.arange(L)[None] <= k)
    total = 0.0
    for i in range(0, len(fixed["t"]), 16):
        sl = slice(i, i + 16)
        x0, noise, t = (fixed[n][sl].to(device) for n in ("x", "noise", "t"))
        xt = bb.noise_scheduler.add_noise(x0, noise, t).to(dtype)
        ctx = _context(fixed["ids"][sl], keep[sl], tables, null, conditioner, stage, device)
        eps = unet(xt, t, ctx.to(dtype)).sample
        total += F.mse_loss(eps.float(), noise.float(), reduction="sum").item()
    return total / fixed["noise"].numel()


class _eval_mode:
    """Within the block every submodule is in eval mode; after it each gets its own mode back. A
    stage trains some levels of an otherwise frozen (eval) conditioner: restoring only the top
    module's flag would put the training levels in eval mode too, and switch their dropout off."""

    def __init__(self, *modules):
        self.modes = [(m, m.training) for mod in modules if mod is not None for m in mod.modules()]

    def __enter__(self):
        for m, _ in self.modes:
            m.training = False

    def __exit__(self, *exc):
        for m, mode in self.modes:
            m.training = mode


class _ema_weights:
    """Within the block, the trainable parameters hold their EMA values."""

    def __init__(self, ema, params):
        self.ema, self.params = ema, params

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.params)


@torch.no_grad()
def _validation_grid(run: Path, stage, step: int, cfg: Config, bb, unet, conditioner, taxonomy, log,
                     acc):
    """One row per level (0..stage level) of the most common species, the same seeds in each row,
    drawn by the public pipeline (DDIM, 25 steps); saved as PNG and sent to the trackers."""
    import numpy as np

    from .imaging import labelled_grid
    with _eval_mode(unet, conditioner):
        rows, labels = _validation_rows(cfg, bb, unet, conditioner, taxonomy, stage)
    f = run / "samples" / stage.name / f"step-{step:07d}.png"
    f.parent.mkdir(parents=True, exist_ok=True)
    grid = labelled_grid(rows, labels, [f"seed {i}" for i in range(cfg.train.validation_seeds)])
    grid.save(f)
    log(f"validation grid: {f}")
    for tracker in acc.trackers:  # the grid as an image beside the loss curves
        if tracker.name == "tensorboard":
            tracker.writer.add_image(f"{stage.name}/validation", np.asarray(grid.convert("RGB")), step,
                                     dataformats="HWC")
        else:
            tracker.log_images({f"{stage.name}/validation": [grid]}, step=step)


def _validation_rows(cfg: Config, bb, unet, conditioner, taxonomy, stage):
    from .pipeline import TaxaDiffusionPipeline, make_scheduler
    pipe = TaxaDiffusionPipeline(unet, make_scheduler("ddim", bb.noise_scheduler.config),
                                 bb.text_encoder, bb.tokenizer, conditioner, bb.vae, taxonomy)
    pipe.set_progress_bar_config(disable=True)
    sp = max(taxonomy.species, key=lambda t: (taxonomy.count(t), t.path))
    top = taxonomy.num_levels - 1 if stage.random_level or stage.text_prompt else stage.level
    guidance = "cfg" if stage.text_prompt else cfg.sample.guidance
    rows, labels = [], []
    for lvl in range(top + 1):
        out = pipe(sp, level=lvl, num_images=cfg.train.validation_seeds, guidance=guidance,
                   guidance_scale=cfg.sample.scale, num_inference_steps=25, seed=0,
                   output_type="uint8", progress=False).images
        rows.append(out)
        labels.append(taxonomy.prompt(taxonomy.ancestors(sp)[lvl]))
    return rows, labels


def _rank_record(run: Path, stage, rank: int, params, sampler) -> None:
    """Per rank: a fingerprint of the trained weights and the data it saw (distributed checks)."""
    import hashlib
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().numpy().tobytes())
    d = run / "ranks"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{stage.name}-rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "weights_sha256": h.hexdigest(), **sampler.record()}))


def _prune(stage_dir: Path, keep: int) -> None:
    steps = sorted((d for d in stage_dir.glob("step-*") if not d.name.endswith(".tmp")),
                   key=lambda d: int(d.name.split("-")[1]))
    for d in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(d, ignore_errors=True)
