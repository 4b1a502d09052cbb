"""TaxaDiffusionPipeline: sample a taxon at any level with TaxaGuide, CFG or no guidance.

    pipe = TaxaDiffusionPipeline.from_pretrained("runs/fish/pipeline")
    images = pipe("Chaetodon auriga", num_images=4, guidance="taxa", guidance_scale=6,
                  num_inference_steps=50, seed=0).images

- Any diffusers scheduler by name (SCHEDULERS), built with `from_config` from the training schedule,
  so training and sampling share one noise schedule.
- The reference and the condition go through the UNet in one batched call.
- Image i of a request draws all its noise (initial and per-step) from its own generator seeded from
  (seed, i): results do not depend on batch size or device count.
- Unseen taxa: a lineage path "A > B > ... > new" whose tail is not in the taxonomy is generated from
  its known ancestors' levels plus the unseen names' own prompts, each through its level's encoder
  (the encoders refine any text embedding; nothing is looked up by id). See `resolve_taxon`.
- save_pretrained / from_pretrained write and read safetensors and JSON only; components are built by
  explicit classes from a plain dict, never by importing a name found in a file. LoRA is kept
  unfused in diffusers' format (pytorch_lora_weights.safetensors, "unet." keys).
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline,
                       DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, ImagePipelineOutput, PNDMScheduler,
                       UNet2DConditionModel, UniPCMultistepScheduler)
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from transformers import CLIPTextModel, CLIPTokenizer

from .conditioning import TaxonomyConditioner, TextEmbeddingCache
from .guidance import cfg as cfg_rule, in_interval, taxaguide
from .taxonomy import Taxon, Taxonomy

SCHEDULERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,     # DPM-Solver++(2M), diffusers' default algorithm
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "pndm": PNDMScheduler,                    # SD v1.5's default (the released code's sampler)
    "unipc": UniPCMultistepScheduler,
}
# SD v1.5's scheduler settings where they differ from a class's defaults (its scheduler_config.json)
SCHEDULER_SETTINGS = {"pndm": {"skip_prk_steps": True, "set_alpha_to_one": False},
                      "ddim": {"set_alpha_to_one": False}}
PIPELINE_FILE = "taxadiffusion.json"


def make_scheduler(name: str, config) -> object:
    """A sampler over the training noise schedule `config` (the one schedule, DESIGN.md)."""
    if name not in SCHEDULERS:
        raise KeyError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(config, **SCHEDULER_SETTINGS.get(name, {}))


def image_seed(seed: int, i: int) -> int:
    """A well-mixed 63-bit seed for image i of a request with `seed` (no (seed, i) collisions)."""
    return int(np.random.SeedSequence([int(seed), int(i)]).generate_state(1, np.uint64)[0] >> 1)


def image_generators(seed: int, n: int, start: int = 0) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(image_seed(seed, start + i)) for i in range(n)]


class TaxaDiffusionPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """UNet (+LoRA) conditioned on a TaxonomyConditioner (or, for the flat baselines, on the lineage
    as plain text when `conditioner` is None)."""

    model_cpu_offload_seq = "text_encoder->conditioner->unet->vae"
    _optional_components = ["vae", "conditioner"]

    def __init__(self, unet: UNet2DConditionModel, scheduler, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, conditioner: TaxonomyConditioner | None = None,
                 vae: AutoencoderKL | None = None, taxonomy: Taxonomy | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder,
                              tokenizer=tokenizer, conditioner=conditioner, vae=vae)
        self.taxonomy = taxonomy
        self.image_processor = VaeImageProcessor(do_resize=False)
        self.text_cache = TextEmbeddingCache(text_encoder, tokenizer, identity="pipeline")

    # -- conditions ------------------------------------------------------------------------------------
    def resolve_taxon(self, taxon: str | Taxon, level: int | str | None = None) -> tuple[str, ...]:
        """The names of the lineage to condition on, truncated to `level`.

        A known name or binomial is looked up (an unknown one raises KeyError listing the closest
        names). A path "A > B > C" may end in names the taxonomy has never seen: the known prefix must
        exist, and the unseen tail is used through its prompts, as described in the module docstring.
        """
        tax = self.taxonomy
        if isinstance(taxon, Taxon):
            names = taxon.path
        elif " > " in taxon:
            names = tuple(n.strip() for n in taxon.split(" > "))
            if len(names) > tax.num_levels:
                raise KeyError(f"{taxon!r} has {len(names)} names; this model has {tax.num_levels} "
                               f"ranks ({', '.join(tax.ranks)})")
            if self.known_depth(names) == 0:
                tax.lookup(names[0], rank=tax.ranks[0])  # raises, naming the closest known names
        else:
            names = tax.lookup(taxon).path
        if level is not None:
            k = tax.level_of(level) if isinstance(level, str) else int(level)
            if not 0 <= k < len(names):
                raise ValueError(f"level {level!r} is below {' > '.join(names)}")
            names = names[: k + 1]
        return names

    def known_depth(self, names: Sequence[str]) -> int:
        """How many leading names of a lineage are taxa this model was trained on."""
        for j in range(len(names), 0, -1):
            if self.taxonomy.find(" > ".join(names[:j])):
                return j
        return 0

    def _prompts(self, names: Sequence[str]) -> list[str]:
        tax = self.taxonomy
        return [tax.prompt(Taxon(l, tuple(names[: l + 1]), tax.ranks[l])) for l in range(len(names))]

    def null_context(self) -> torch.Tensor:
        """The raw text embedding of "" (SD's unconditional input; trained by level dropout)."""
        return self.text_cache.encode([""])[0]

    def context(self, names: Sequence[str]) -> torch.Tensor:
        """(77, D) cross-attention context for a lineage prefix (empty: the null context)."""
        if not names:
            return self.null_context()
        prompts = self._prompts(names)
        if self.conditioner is None:  # flat baselines: the lineage as one text prompt
            return self.text_cache.encode([", ".join(prompts)])[0]
        emb = self.text_cache.encode(prompts)[None].to(self.device, self.conditioner.dtype)
        keep = torch.ones(1, len(names), dtype=torch.bool, device=self.device)
        return self.conditioner(emb, keep, self.null_context().to(self.device))[0]

    def reference(self, names: Sequence[str], guidance: str, guide_level: int) -> torch.Tensor | None:
        if guidance == "none":
            return None
        if guidance == "cfg" or len(names) == 1:
            # TaxaGuide at level 0 has no ancestor to guide against: it is CFG there.
            return self.context(())
        if guidance == "taxa":
            if not 0 <= guide_level < len(names) - 1:
                raise ValueError(f"guide_level {guide_level} must be above the sampled level "
                                 f"{len(names) - 1}")
            return self.context(names[: guide_level + 1])
        raise ValueError(f"guidance must be 'taxa', 'cfg' or 'none', got {guidance!r}")

    # -- sampling -----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, taxon: str | Taxon, level: int | str | None = None, num_images: int = 1,
                 guidance: str = "taxa", guidance_scale: float = 6.0, guide_level: int = 0,
                 guidance_interval: tuple[float, float] = (0.0, 1.0), num_inference_steps: int = 50,
                 seed: int = 0, generator: list[torch.Generator] | None = None,
                 output_type: str = "pil", batch_size: int = 16,
                 callback_on_step_end: Callable | None = None, return_dict: bool = True,
                 progress: bool = True):
        names = self.resolve_taxon(taxon, level)
        dtype = self.unet.dtype
        cond = self.context(names).to(self.device, dtype)
        ref = self.reference(names, guidance, guide_level)
        ref = None if ref is None else ref.to(self.device, dtype)
        rule = {"taxa": taxaguide, "cfg": cfg_rule}.get(guidance)
        if generator is None:
            generator = image_generators(seed, num_images)
        if len(generator) != num_images:
            raise ValueError(f"{len(generator)} generators for {num_images} images")
        size = self.unet.config.sample_size
        shape = (self.unet.config.in_channels, size, size)
        takes_gen = "generator" in inspect.signature(self.scheduler.step).parameters
        out = []
        bar = self.progress_bar(total=num_images * num_inference_steps) if progress else None
        for b0 in range(0, num_images, batch_size):
            gens = generator[b0:b0 + batch_size]
            n = len(gens)
            # initial noise per image on the CPU: the same numbers on every device
            x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(self.device, dtype)
            self.scheduler.set_timesteps(num_inference_steps, device=self.device)
            x = x * self.scheduler.init_noise_sigma
            ts = self.scheduler.timesteps
            for i, t in enumerate(ts):
                xin = self.scheduler.scale_model_input(x, t)
                guided = ref is not None and in_interval(i, len(ts), guidance_interval)
                if guided:  # reference and condition in one UNet call
                    ctx = torch.cat([ref.expand(n, -1, -1), cond.expand(n, -1, -1)])
                    e_ref, e_cond = self.unet(torch.cat([xin, xin]), t, ctx).sample.chunk(2)
                    eps = rule(e_ref, e_cond, guidance_scale)
                else:
                    eps = self.unet(xin, t, cond.expand(n, -1, -1)).sample
                kw = {"generator": gens} if takes_gen else {}
                x = self.scheduler.step(eps, t, x, **kw).prev_sample
                if callback_on_step_end is not None:
                    res = callback_on_step_end(self, i, t, {"latents": x}) or {}
                    x = res.get("latents", x)
                if bar is not None:
                    bar.update(n)
            out.append(self.decode(x))
        if bar is not None:
            bar.close()
        images = torch.cat(out)
        if output_type == "uint8":
            images = (images / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
        elif output_type != "latent":
            images = self.image_processor.postprocess(images.float(), output_type=output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> image in [-1, 1]."""
        if self.vae is None:
            return x.clamp(-1, 1)
        x = (x / self.vae.config.scaling_factor).to(self.vae.dtype)  # the VAE may be in another dtype
        return self.vae.decode(x).sample.float().clamp(-1, 1)

    # -- persistence ------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, **_) -> None:
        from .checkpoint import save_lora, save_unet_base
        d = Path(save_directory)
        d.mkdir(parents=True, exist_ok=True)
        has_lora = bool(getattr(self.unet, "peft_config", None))
        # the base UNet without adapter layers, plus the LoRA unfused in diffusers' format
        save_unet_base(self.unet, d / "unet")
        if has_lora:
            save_lora(self.unet, d)
        self.text_encoder.save_pretrained(d / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(d / "tokenizer")
        self.scheduler.save_pretrained(d / "scheduler")
        if self.vae is not None:
            self.vae.save_pretrained(d / "vae", safe_serialization=True)
        if self.conditioner is not None:
            self.conditioner.save_pretrained(d / "conditioner", safe_serialization=True)
        self.taxonomy.save(d / "taxonomy.json")
        sched = next(k for k, v in SCHEDULERS.items() if type(self.scheduler) is v)
        (d / PIPELINE_FILE).write_text(json.dumps({
            "format": "taxadiffusion-pipeline/1", "scheduler": sched, "lora": has_lora,
            "conditioner": self.conditioner is not None, "vae": self.vae is not None}, indent=1))

    @classmethod
    def from_pretrained(cls, path: str | Path, torch_dtype: torch.dtype = torch.float32,
                        scheduler: str | None = None, **_) -> "TaxaDiffusionPipeline":
        d = Path(path)
        if not (d / PIPELINE_FILE).exists():
            raise FileNotFoundError(f"{d} is not a saved TaxaDiffusionPipeline: {PIPELINE_FILE} is "
                                    f"missing (a training run or checkpoint? use from_checkpoint)")
        meta = json.loads((d / PIPELINE_FILE).read_text())
        kw = dict(use_safetensors=True, local_files_only=True, torch_dtype=torch_dtype)
        unet = UNet2DConditionModel.from_pretrained(d / "unet", **kw)
        te = CLIPTextModel.from_pretrained(d / "text_encoder", **kw)
        tok = CLIPTokenizer.from_pretrained(d / "tokenizer", local_files_only=True)
        sched_cls = SCHEDULERS[scheduler or meta["scheduler"]]
        sched = sched_cls.from_config(sched_cls.load_config(d / "scheduler"))
        vae = AutoencoderKL.from_pretrained(d / "vae", **kw) if meta["vae"] else None
        cond = (TaxonomyConditioner.from_pretrained(d / "conditioner", **kw)
                if meta["conditioner"] else None)
        pipe = cls(unet, sched, te, tok, cond, vae, Taxonomy.load(d / "taxonomy.json"))
        if meta["lora"]:
            pipe.load_lora_weights(d, weight_name="pytorch_lora_weights.safetensors")
        for m in (unet, te, vae, cond):
            if m is not None:
                m.eval()
        return pipe

    @classmethod
    def from_checkpoint(cls, path: str | Path, scheduler: str | None = None,
                        torch_dtype: torch.dtype = torch.float32) -> "TaxaDiffusionPipeline":
        """A training run folder (its latest checkpoint), a checkpoint folder, or a saved pipeline."""
        from .checkpoint import load_pipeline_parts, resolve_checkpoint
        p = Path(path)
        if (p / PIPELINE_FILE).exists():
            return cls.from_pretrained(p, torch_dtype, scheduler)
        ckpt = resolve_checkpoint(p)
        parts, cfg = load_pipeline_parts(ckpt, torch_dtype)
        sched = make_scheduler(scheduler or cfg.sample.scheduler, parts.pop("noise_scheduler").config)
        return cls(scheduler=sched, **parts)
