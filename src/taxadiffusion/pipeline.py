"""TaxaDiffusionPipeline: sample a taxon at any level with TaxaGuide, CFG or no guidance.

    pipe = TaxaDiffusionPipeline.from_pretrained("exports/fish")       # `taxadiffusion export`
    images = pipe("Chaetodon auriga", num_images_per_prompt=4,
                  generator=torch.Generator().manual_seed(0)).images

- Any diffusers scheduler by name (SCHEDULERS), built with `from_config` from the training schedule,
  so training and sampling share one noise schedule.
- The reference and the condition go through the UNet in one batched call.
- Image i of a request draws all its noise (initial and per-step) from its own generator seeded from
  (seed, i): results do not depend on batch size or device count. One torch.Generator instead of a
  seed: a seed is drawn from it first (see `request_generators`).
- Defaults of a call (guidance, scale, steps, ...) are the pipeline's `sample_config`: the run's
  sample section for a pipeline made from a run or an export, else the paper's (config.SampleConfig).
- Unseen taxa: a lineage path "A > B > ... > new" whose tail is not in the taxonomy is generated from
  its known ancestors' levels plus the unseen names' own prompts, each through its level's encoder
  (the encoders refine any text embedding; nothing is looked up by id). See `resolve_taxon`.
- save_pretrained / from_pretrained: diffusers' layout, safetensors and JSON only, the LoRA unfused
  in diffusers' format with its LoraConfig (alpha/r survives); `from_pretrained` builds explicit
  classes and never runs code from the folder, while `diffusers.DiffusionPipeline.from_pretrained(
  folder, trust_remote_code=True)` loads it too. The layout and why: pipeline_io.py.
"""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from transformers import CLIPTextModel, CLIPTokenizer

from .conditioning import TaxonomyConditioner, TextEmbeddingCache, embedding_dtype
from .config import SampleConfig, from_dict
from .guidance import cfg as cfg_rule, in_interval, taxaguide
from .pipeline_io import PIPELINE_FILE  # noqa: F401  (callers find a saved pipeline by it)
from .schedulers import SCHEDULERS, make_scheduler  # noqa: F401  (part of the pipeline's API)
from .taxonomy import Taxon, Taxonomy

OUTPUT_TYPES = ("pil", "np", "pt", "uint8", "latent")


def image_seed(seed: int, i: int) -> int:
    """A well-mixed 63-bit seed for image i of a request with `seed` (no (seed, i) collisions)."""
    return int(np.random.SeedSequence([int(seed), int(i)]).generate_state(1, np.uint64)[0] >> 1)


def image_generators(seed: int, n: int, start: int = 0) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(image_seed(seed, start + i)) for i in range(n)]


def request_generators(n: int, seed: int | None = None,
                       generator: torch.Generator | Sequence[torch.Generator] | None = None
                       ) -> list[torch.Generator]:
    """One CPU generator per image. A list is used as given (one per image). One generator: a 63-bit
    seed is drawn from it (advancing it, as diffusers' pipelines consume theirs, so the next call gives
    new images) and image i gets `image_seed(that seed, i)`, as a request with `seed=` that number;
    so the images still do not depend on batch size. Neither: `seed` (default 0)."""
    if generator is not None and seed is not None:
        raise ValueError("give seed or generator, not both")
    if isinstance(generator, torch.Generator):
        drawn = torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device)
        return image_generators(int(drawn.item()), n)
    if generator is not None:
        gens = list(generator)
        if len(gens) != n:
            raise ValueError(f"{len(gens)} generators for {n} images")
        return gens
    return image_generators(0 if seed is None else seed, n)


class TaxaDiffusionPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """UNet (+LoRA) conditioned on a TaxonomyConditioner (or, for the flat baselines, on the lineage
    as plain text when `conditioner` is None).

    `taxonomy` and `sample_defaults` (a SampleConfig or its dict) are registered config values, so they
    are written to model_index.json and diffusers' loader passes them back. The taxonomy lives there,
    not in a file beside it, because diffusers' hub download fetches model_index.json and the
    component folders only, and hands __init__ config values, never the folder. `lora_weight_name`:
    the LoRA file beside model_index.json, loaded when a loader records the folder (register_to_config).
    """

    model_cpu_offload_seq = "text_encoder->conditioner->unet->vae"
    _optional_components = ["vae", "conditioner"]

    def __init__(self, unet: UNet2DConditionModel, scheduler, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, conditioner: TaxonomyConditioner | None = None,
                 vae: AutoencoderKL | None = None, taxonomy: Taxonomy | Mapping | None = None,
                 sample_defaults: SampleConfig | Mapping | None = None,
                 lora_weight_name: str | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder,
                              tokenizer=tokenizer, conditioner=conditioner, vae=vae)
        self.taxonomy = taxonomy
        self.sample_config = sample_defaults
        self.register_to_config(lora_weight_name=lora_weight_name)
        self.image_processor = VaeImageProcessor(do_resize=False)
        self.text_cache = TextEmbeddingCache(text_encoder, tokenizer, identity="pipeline",
                                             dtype=embedding_dtype(text_encoder.config.hidden_size))

    # properties, so that the registered config (what model_index.json gets) follows any assignment
    @property
    def taxonomy(self) -> Taxonomy | None:
        return self._taxonomy

    @taxonomy.setter
    def taxonomy(self, value: Taxonomy | Mapping | None) -> None:
        self._taxonomy = Taxonomy.from_dict(value) if isinstance(value, Mapping) else value
        self.register_to_config(taxonomy=None if value is None else self._taxonomy.to_dict())

    @property
    def sample_config(self) -> SampleConfig:
        return self._sample_config

    @sample_config.setter
    def sample_config(self, value: SampleConfig | Mapping | None) -> None:
        if isinstance(value, Mapping):
            value = from_dict(dict(value), SampleConfig, "sample_defaults.")
        self._sample_config = dataclasses.replace(value) if value is not None else SampleConfig()
        self.register_to_config(sample_defaults=dataclasses.asdict(self._sample_config))

    def register_to_config(self, **kwargs) -> None:
        super().register_to_config(**kwargs)
        # DiffusionPipeline.from_pretrained ends with register_to_config(_name_or_path=<folder or hub
        # id>): the one point where a pipeline loaded by diffusers knows where it came from, so the
        # unfused LoRA beside model_index.json is loaded here (our from_pretrained goes the same way).
        src = kwargs.get("_name_or_path")
        name = self.config.get("lora_weight_name") if src is not None else None
        if name and not getattr(self.unet, "peft_config", None):
            # load_lora_weights without its text-encoder pass (our LoRA is the UNet's alone)
            sd, alphas, meta = self.lora_state_dict(str(src), weight_name=name, use_safetensors=True,
                                                    return_lora_metadata=True)
            self.load_lora_into_unet(sd, alphas, self.unet, metadata=meta, _pipeline=self)

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
    def __call__(self, taxon: str | Taxon, level: int | str | None = None,
                 num_images_per_prompt: int | None = None, guidance: str | None = None,
                 guidance_scale: float | None = None, guide_level: int | None = None,
                 guidance_interval: tuple[float, float] | None = None,
                 num_inference_steps: int | None = None, seed: int | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 output_type: str = "pil", batch_size: int | None = None,
                 callback_on_step_end: Callable | None = None, return_dict: bool = True,
                 progress: bool = True, num_images: int | None = None):
        """Images of `taxon` (a name, binomial or lineage path) at `level` (default: its own).

        Unset settings come from `self.sample_config`. `num_images` is an alias of
        `num_images_per_prompt` (default 1). `seed` or `generator`: see `request_generators`.
        output_type: "pil" (list of PIL images), "np" ((N, H, W, 3) float in [0, 1]), "pt"
        ((N, 3, H, W) float in [0, 1]), "uint8" ((N, 3, H, W) uint8) or "latent" (the final latents,
        not decoded).
        """
        sc = self.sample_config
        if num_images is not None and num_images_per_prompt not in (None, num_images):
            raise ValueError(f"num_images={num_images} and num_images_per_prompt="
                             f"{num_images_per_prompt} disagree (num_images is its alias)")
        n = num_images_per_prompt or num_images or 1
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        guidance = guidance or sc.guidance
        scale = sc.scale if guidance_scale is None else guidance_scale
        steps = num_inference_steps or sc.steps
        interval = guidance_interval or (sc.guidance_start, sc.guidance_stop)
        batch_size = batch_size or sc.batch_size
        names = self.resolve_taxon(taxon, level)
        dtype = self.unet.dtype
        cond = self.context(names).to(self.device, dtype)
        ref = self.reference(names, guidance, sc.guide_level if guide_level is None else guide_level)
        ref = None if ref is None else ref.to(self.device, dtype)
        rule = {"taxa": taxaguide, "cfg": cfg_rule}.get(guidance)
        generator = request_generators(n, seed, generator)
        size = self.unet.config.sample_size
        shape = (self.unet.config.in_channels, size, size)
        takes_gen = "generator" in inspect.signature(self.scheduler.step).parameters
        out = []
        bar = self.progress_bar(total=n * steps) if progress else None
        for b0 in range(0, n, batch_size):
            gens = generator[b0:b0 + batch_size]
            m = len(gens)
            # initial noise per image on the CPU: the same numbers on every device
            x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(self.device, dtype)
            self.scheduler.set_timesteps(steps, device=self.device)
            x = x * self.scheduler.init_noise_sigma
            ts = self.scheduler.timesteps
            for i, t in enumerate(ts):
                xin = self.scheduler.scale_model_input(x, t)
                guided = ref is not None and in_interval(i, len(ts), interval)
                if guided:  # reference and condition in one UNet call
                    ctx = torch.cat([ref.expand(m, -1, -1), cond.expand(m, -1, -1)])
                    e_ref, e_cond = self.unet(torch.cat([xin, xin]), t, ctx).sample.chunk(2)
                    eps = rule(e_ref, e_cond, scale)
                else:
                    eps = self.unet(xin, t, cond.expand(m, -1, -1)).sample
                kw = {"generator": gens} if takes_gen else {}
                x = self.scheduler.step(eps, t, x, **kw).prev_sample
                if callback_on_step_end is not None:
                    res = callback_on_step_end(self, i, t, {"latents": x}) or {}
                    x = res.get("latents", x)
                if bar is not None:
                    bar.update(m)
            out.append(x if output_type == "latent" else self.decode(x))
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
    def save_pretrained(self, save_directory: str | Path, safe_serialization: bool = True,
                        **kwargs) -> None:
        """diffusers' layout, safetensors and JSON only (pipeline_io.write_pipeline)."""
        from .pipeline_io import write_pipeline
        if not safe_serialization:
            raise ValueError("a TaxaDiffusionPipeline is saved as safetensors only")
        if kwargs.get("push_to_hub"):
            raise ValueError("push with taxadiffusion.export.push_folder (or `taxadiffusion export "
                             "--push-to-hub`), which uploads the whole export")
        write_pipeline(self, Path(save_directory))

    @classmethod
    def from_pretrained(cls, path: str | Path, torch_dtype: torch.dtype = torch.float32,
                        scheduler: str | None = None, **_) -> "TaxaDiffusionPipeline":
        """A folder written by save_pretrained or `taxadiffusion export` (pipeline_io.read_pipeline):
        JSON read, explicit classes built, no code from the folder run. `scheduler` (a SCHEDULERS
        name) replaces the saved sampler, on the same noise schedule."""
        from .pipeline_io import read_pipeline
        return read_pipeline(cls, Path(path), torch_dtype, scheduler)

    @classmethod
    def from_checkpoint(cls, path: str | Path, scheduler: str | None = None,
                        torch_dtype: torch.dtype = torch.float32,
                        pretrained: str | None = None) -> "TaxaDiffusionPipeline":
        """A training run folder (its latest checkpoint), a checkpoint folder, or a saved pipeline.
        The run's sample section becomes the call defaults (`scheduler` replaces its sampler);
        `pretrained`: where an SD-based run's frozen base is now (default: its config's)."""
        from .checkpoint import load_pipeline_parts, resolve_checkpoint
        p = Path(path)
        if (p / PIPELINE_FILE).exists():
            return cls.from_pretrained(p, torch_dtype, scheduler)
        ckpt = resolve_checkpoint(p)
        parts, cfg = load_pipeline_parts(ckpt, torch_dtype, pretrained)
        name = scheduler or cfg.sample.scheduler
        sched = make_scheduler(name, parts.pop("noise_scheduler").config)
        return cls(scheduler=sched, sample_defaults=dataclasses.replace(cfg.sample, scheduler=name),
                   **parts)
