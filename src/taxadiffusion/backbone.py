"""The frozen and adapted parts: UNet, VAE, CLIP text encoder and tokenizer, noise schedule, LoRA.

Two sources, one interface (`Backbone`):
- `load_sd15(path)`: Stable Diffusion v1.5 parts from a local diffusers folder or the user's hub cache.
  Nothing is downloaded; a missing part gets an error naming the files and how to obtain them.
- `build_tiny(cfg, resolution)`: the same classes (UNet2DConditionModel, CLIPTextModel, CLIPTokenizer
  with the real CLIP BPE vocabulary from open_clip's wheel) at random init with small configs, for
  CPU runs and tests. A tiny backbone has no pretrained weights, so its checkpoints carry its UNet and
  text encoder (see training.save_checkpoint).
The noise schedule is built once from the model config and shared by training and sampling
(the released code trains on "linear" betas and samples on "scaled_linear": REFERENCE-FACTS.md).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .config import ModelConfig

SD15_PARTS = {  # subfolder -> files that must exist (safetensors only: loading never unpickles)
    "unet": ["config.json", "diffusion_pytorch_model.safetensors"],
    "vae": ["config.json", "diffusion_pytorch_model.safetensors"],
    "text_encoder": ["config.json", "model.safetensors"],
    "scheduler": ["scheduler_config.json"],
}
# a tokenizer folder holds the BPE files (the SD v1.5 snapshot on the hub) or tokenizer.json alone
# (what current transformers saves); CLIPTokenizer reads either
TOKENIZER_LAYOUTS = (["tokenizer.json"], ["vocab.json", "merges.txt"])
# SD v1.5's UNet: diffusers' UNet2DConditionModel defaults with 768-d CLIP-L context, 64x64 latents.
SD15_UNET_CONFIG = dict(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768,
                        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                        attention_head_dim=8)
VAE_SCALE = 0.18215  # SD v1.5 latent scaling factor (vae/config.json scaling_factor)
# openai/clip-vit-large-patch14's text tower, as SD v1.5's text_encoder/config.json
CLIP_L_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                     projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
# SD v1.5's vae/config.json
SD15_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                       block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=VAE_SCALE)


@dataclass
class Backbone:
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    vae: AutoencoderKL | None          # None: pixel space
    noise_scheduler: DDPMScheduler     # the one schedule; samplers are built from its config
    source: str                        # "tiny" (built in code: checkpoints carry it) or the SD folder

    @property
    def context_dim(self) -> int:
        return self.text_encoder.config.hidden_size

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels


def noise_scheduler(cfg: ModelConfig, pixel_space: bool) -> DDPMScheduler:
    # clip_sample keeps predicted x0 in the data range: right for pixels, wrong for SD latents.
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         beta_start=cfg.beta_start, beta_end=cfg.beta_end, prediction_type="epsilon",
                         clip_sample=pixel_space, steps_offset=1, timestep_spacing="leading")


def min_snr_weight(scheduler: DDPMScheduler, t: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Per-sample loss weight min(SNR, gamma) / SNR for epsilon prediction (min-SNR weighting, Hang et
    al. 2023, as diffusers' train scripts' --snr_gamma); all ones when gamma is None or 0."""
    if not gamma:
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    from diffusers.training_utils import compute_snr
    snr = compute_snr(scheduler, t).float()
    return snr.clamp(max=gamma) / snr


# -- Stable Diffusion v1.5 -----------------------------------------------------------------------------
def resolve_sd15(path_or_id: str) -> Path:
    """A local folder, or the snapshot of a hub id in the user's cache; never a download."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        root = p
    else:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
        try:
            root = Path(snapshot_download(path_or_id, local_files_only=True))
        except (LocalEntryNotFoundError, ValueError, OSError) as e:
            from huggingface_hub import constants
            raise FileNotFoundError(
                f"Stable Diffusion v1.5 weights not found: {path_or_id!r} is not a local folder and is "
                f"not in the hub cache {constants.HF_HUB_CACHE}. Nothing is downloaded at run time. On a "
                f"machine with internet run `huggingface-cli download {path_or_id} --include "
                f"'unet/*' 'vae/*' 'text_encoder/*' 'tokenizer/*' 'scheduler/*' model_index.json` "
                f"(it fills that cache), or point at a local folder: train takes "
                f"model.pretrained=/path/to/folder; sample, evaluate and export take --pretrained "
                f"/path/to/folder.") from e
    missing = [f"{sub}/{f}" for sub, files in SD15_PARTS.items() for f in files
               if not (root / sub / f).exists()]
    if not any(all((root / "tokenizer" / f).exists() for f in lay) for lay in TOKENIZER_LAYOUTS):
        missing.append("tokenizer/tokenizer.json (or tokenizer/vocab.json + tokenizer/merges.txt)")
    if missing:
        subs = " ".join(f"'{m.split('/')[0]}/*'" for m in dict.fromkeys(m.split("/")[0] + "/"
                                                                        for m in missing))
        raise FileNotFoundError(
            f"Stable Diffusion v1.5 folder {root} lacks {', '.join(missing)}. We load safetensors "
            f"only; on a machine with internet run `huggingface-cli download stable-diffusion-v1-5/"
            f"stable-diffusion-v1-5 --include {subs} --local-dir {root}`.")
    return root


def load_sd15(cfg: ModelConfig, torch_dtype: torch.dtype = torch.float32) -> Backbone:
    root = resolve_sd15(cfg.pretrained)
    kw = dict(local_files_only=True, use_safetensors=True, torch_dtype=torch_dtype)
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", **kw)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", **kw)
    te = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **kw)
    tok = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
    sched_cfg = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    ours = noise_scheduler(cfg, pixel_space=False)
    for k in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps"):
        if k in sched_cfg and sched_cfg[k] != ours.config[k]:
            raise ValueError(f"model.{k}={ours.config[k]} differs from {root}/scheduler: "
                             f"{sched_cfg[k]}; training and sampling must share one schedule")
    return Backbone(unet, te, tok, vae, ours, str(root))


# -- tiny parts built in code ----------------------------------------------------------------------------
def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary (49408 tokens) and merges, rebuilt offline from the merges file that
    open_clip's wheel ships: the same slice open_clip's SimpleTokenizer takes (49152 - 256 - 2 merges
    after the header), the same token order as openai/clip-vit-large-patch14's vocab.json."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1: 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def clip_tokenizer() -> CLIPTokenizer:
    """SD v1.5's tokenizer (`clip_vocabulary`), model_max_length 77, padding with <|endoftext|> as
    SD v1.5's tokenizer does (tests/test_backbone.py compares to open_clip)."""
    vocab, merges = clip_vocabulary()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def tiny_unet(cfg: ModelConfig, resolution: int, in_channels: int) -> UNet2DConditionModel:
    n = len(cfg.block_out_channels)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.cross_attn_levels[:n])
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.cross_attn_levels[:n]))
    return UNet2DConditionModel(
        sample_size=resolution, in_channels=in_channels, out_channels=in_channels,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        down_block_types=down, up_block_types=up, cross_attention_dim=cfg.text_width,
        attention_head_dim=cfg.attention_head_dim, norm_num_groups=min(8, cfg.block_out_channels[0]))


def tiny_text_encoder(cfg: ModelConfig) -> CLIPTextModel:
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    if cfg.text_token_std is not None:
        te.embeddings.token_embedding.weight.data.normal_(0.0, cfg.text_token_std)
    return te


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(32, 64), norm_num_groups=8)


# -- the shipped tiny bases (pretrained by tinybase.py) ----------------------------------------------------
ASSET = Path(__file__).parent / "assets" / "tiny-base"
# the shipped bases by name (model.pretrained_unet); any other value is a folder
BUILTIN = {
    "builtin": ASSET,  # 3,500 caption steps: the demo's base
    # + 3 x 1,200 min-SNR caption steps (recipe.json's "init" chain, seeds 1235-1237; README, eighth
    # set): the base on which `all` draws the species mark at the species column (ninth set)
    "builtin-3600": ASSET.parent / "tiny-base-3600",
}


def base_dir(pretrained_unet: str) -> Path:
    """The folder of a base named in `model.pretrained_unet`: a BUILTIN name (shipped) or a path."""
    return BUILTIN.get(pretrained_unet, Path(pretrained_unet))


# the ModelConfig fields that determine the tiny UNet and text encoder (must match to load the base)
TINY_KEYS = ("pixel_space", "block_out_channels", "layers_per_block", "cross_attn_levels",
             "attention_head_dim", "text_width", "text_layers", "text_heads", "beta_schedule",
             "beta_start", "beta_end", "num_train_timesteps", "text_token_std")


def build_tiny(cfg: ModelConfig, resolution: int, seed: int = 0) -> Backbone:
    """Random-init parts with the SD classes; deterministic for a given seed. With
    `cfg.pretrained_unet`, the UNet is the pretrained tiny base (tinybase.py) and the text encoder is
    rebuilt from seed 0, as it was for pretraining."""
    if cfg.pretrained_unet:
        seed = 0  # the text encoder the base was pretrained with
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        te = tiny_text_encoder(cfg).eval().requires_grad_(False)
        vae = None if cfg.pixel_space else tiny_vae().eval().requires_grad_(False)
        size = resolution if cfg.pixel_space else resolution // 2
        unet = tiny_unet(cfg, size, 3 if cfg.pixel_space else 4)
    if cfg.pretrained_unet:
        load_tiny_base(cfg, unet, te)
    return Backbone(unet, te, clip_tokenizer(), vae, noise_scheduler(cfg, cfg.pixel_space), "tiny")


def load_tiny_base(cfg: ModelConfig, unet: UNet2DConditionModel, text_encoder: CLIPTextModel) -> None:
    """Load the pretrained tiny base into `unet`, after checking it was made for this architecture,
    noise schedule and text encoder (recipe.json beside unet.safetensors)."""
    from safetensors.torch import load_file
    d = base_dir(cfg.pretrained_unet)
    weights, recipe = d / "unet.safetensors", d / "recipe.json"
    for f in (weights, recipe):
        if not f.exists():
            raise FileNotFoundError(f"tiny base {f} is missing; make it with `python -m "
                                    f"taxadiffusion.tinybase --out {d}` (about an hour on 2 CPU cores)")
    r = json.loads(recipe.read_text())
    diff = {k: (r["model"].get(k), getattr(cfg, k)) for k in TINY_KEYS
            if r["model"].get(k) != getattr(cfg, k)}
    if diff:
        raise ValueError(f"{recipe}: the base was pretrained with other model settings "
                         f"{ {k: v[0] for k, v in diff.items()} }, this config has "
                         f"{ {k: v[1] for k, v in diff.items()} }")
    fp = module_fingerprint(text_encoder)
    if fp != r["text_encoder_fingerprint"]:
        raise ValueError(f"{recipe}: the tiny text encoder rebuilt from seed 0 has fingerprint {fp}, "
                         f"the base was pretrained with {r['text_encoder_fingerprint']} (another torch "
                         f"version initialises differently?); pretrain the base again with "
                         f"`python -m taxadiffusion.tinybase --out {d}`")
    unet.load_state_dict(load_file(weights))


def build_sd15_random(cfg: ModelConfig, resolution: int, seed: int = 0) -> Backbone:
    """SD v1.5's exact architectures (UNet, VAE, CLIP-L text encoder) at random init: for benchmarks
    and tests of the real-size path on machines without the weights. Not for sampling."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**{**SD15_UNET_CONFIG, "sample_size": resolution // 8})
        te = CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG)).eval().requires_grad_(False)
        vae = AutoencoderKL(**SD15_VAE_CONFIG).eval().requires_grad_(False)
    return Backbone(unet, te, clip_tokenizer(), vae, noise_scheduler(cfg, pixel_space=False), "tiny")


BUILDERS = {  # model.base -> how the parts are made
    "tiny": lambda cfg, res, seed, dtype: build_tiny(cfg, res, seed),
    "sd15": lambda cfg, res, seed, dtype: load_sd15(cfg, dtype),
    "sd15-random": lambda cfg, res, seed, dtype: build_sd15_random(cfg, res, seed),
}


def build_backbone(cfg: ModelConfig, resolution: int, seed: int = 0,
                   torch_dtype: torch.dtype = torch.float32) -> Backbone:
    if cfg.base not in BUILDERS:
        raise ValueError(f"model.base must be one of {', '.join(BUILDERS)}, got {cfg.base!r}")
    return BUILDERS[cfg.base](cfg, resolution, seed, torch_dtype)


# -- LoRA (peft, as diffusers' train_text_to_image_lora.py) ---------------------------------------------
def add_lora(unet: UNet2DConditionModel, cfg: ModelConfig) -> None:
    """LoRA on every attention's to_q, to_k, to_v, to_out.0 (paper Sec. A.2: rank 4, alpha 4)."""
    from peft import LoraConfig
    unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                init_lora_weights="gaussian", target_modules=list(cfg.lora_targets)))


def lora_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in unet.named_parameters() if "lora_" in n]


def base_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in unet.named_parameters() if "lora_" not in n]


# -- identities (cache keys) -------------------------------------------------------------------------------
def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over config and every parameter's bytes: what a cache keyed on this module may trust."""
    h = hashlib.sha256()
    conf = getattr(module, "config", None)
    if conf is not None:
        # a diffusers config (a FrozenDict) lists `_use_default_values` in set order, which differs
        # from process to process: its private keys say nothing about the weights, so they are left out
        d = conf.to_dict() if hasattr(conf, "to_dict") else {k: v for k, v in dict(conf).items()
                                                             if not k.startswith("_")}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    """$TAXADIFFUSION_CACHE, else ~/.cache/taxadiffusion."""
    return Path(os.environ.get("TAXADIFFUSION_CACHE", Path.home() / ".cache" / "taxadiffusion"))
