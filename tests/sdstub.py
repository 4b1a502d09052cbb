"""A tiny random Stable Diffusion v1.5 stand-in, written in exact diffusers format.

`write_sd15_stub(folder)` builds SD v1.5's component classes with SD's block layout at tiny widths
(UNet2DConditionModel: three cross-attention down blocks and one plain, mirrored up; AutoencoderKL
with 4 latent channels, 8x downsampling and SD's scaling factor; CLIPTextModel; CLIPTokenizer with
the real CLIP BPE vocabulary that open_clip ships; SD v1.5's PNDM scheduler config) and writes them
with `StableDiffusionPipeline.save_pretrained`, so the folder is what a user's hub snapshot looks
like. `tokenizer_layout="json"` leaves tokenizer.json only, as current transformers saves it;
"bpe" keeps vocab.json + merges.txt, as the SD v1.5 snapshot on the hub has them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

# SD v1.5's scheduler/scheduler_config.json
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True,
                      steps_offset=1, clip_sample=False)
CROSS = 32   # tiny cross-attention width (SD: 768)


def build_sd15_stub(seed: int = 0):
    """The five components at tiny sizes, deterministic for `seed`."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from taxadiffusion.backbone import clip_tokenizer
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(16, 16, 32, 32), norm_num_groups=8, cross_attention_dim=CROSS,
            attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
            block_out_channels=(8, 16, 16, 16), norm_num_groups=8, sample_size=64,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=0.18215)
        te = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=CROSS, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
            projection_dim=CROSS, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    return dict(unet=unet, vae=vae, text_encoder=te, tokenizer=clip_tokenizer(),
                scheduler=PNDMScheduler.from_config(SD15_SCHEDULER))  # as the file: extra keys kept


def write_sd15_stub(folder: str | Path, tokenizer_layout: str = "bpe", seed: int = 0) -> Path:
    """Write the stand-in with StableDiffusionPipeline.save_pretrained (safetensors only)."""
    from diffusers import StableDiffusionPipeline
    folder = Path(folder)
    pipe = StableDiffusionPipeline(**build_sd15_stub(seed), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    tok = folder / "tokenizer"
    if tokenizer_layout == "bpe":  # the hub snapshot's files: vocab.json + merges.txt, no tokenizer.json
        from taxadiffusion.backbone import clip_vocabulary
        vocab, merges = clip_vocabulary()
        (tok / "vocab.json").write_text(json.dumps(vocab))
        (tok / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        (tok / "tokenizer.json").unlink(missing_ok=True)
    elif tokenizer_layout == "json":  # what current transformers writes
        for f in ("vocab.json", "merges.txt"):
            (tok / f).unlink(missing_ok=True)
        if not (tok / "tokenizer.json").exists():
            raise RuntimeError(f"{tok}: this transformers wrote no tokenizer.json")
    else:
        raise ValueError(f"tokenizer_layout must be 'bpe' or 'json', got {tokenizer_layout!r}")
    return folder
