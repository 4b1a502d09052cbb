"""TaxaDiffusionPipeline: batch-size independence, save/load round trip, guidance wiring, taxa lookup,
the diffusers-style call (num_images_per_prompt, one generator, output types, defaults)."""
import json

import numpy as np
import pytest
import torch

from taxadiffusion.backbone import add_lora, build_tiny
from taxadiffusion.config import ModelConfig, SampleConfig
from taxadiffusion.conditioning import TaxonomyConditioner
from taxadiffusion.pipeline import SCHEDULERS, TaxaDiffusionPipeline, image_seed, make_scheduler
from taxadiffusion.taxonomy import Taxonomy

RANKS = ("class", "order", "family", "genus", "species")
LINEAGES = [("Aves", "Passeriformes", "Corvidae", "Corvus", e) for e in ("corax", "brachyrhynchos")] + \
           [("Aves", "Passeriformes", "Paridae", "Poecile", "atricapillus")]


@pytest.fixture(scope="module")
def pipe():
    mc = ModelConfig(base="tiny", block_out_channels=[16, 32], cross_attn_levels=[False, True],
                     text_width=32, level_heads=4, level_ff=64)
    bb = build_tiny(mc, 16, seed=0)
    add_lora(bb.unet, mc)
    torch.manual_seed(1)
    with torch.no_grad():  # non-trivial LoRA and levels so the round trip tests real weights
        for n, p in bb.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    cond = TaxonomyConditioner(5, 32, 1, 4, 64, 0.0, zero_init=False).eval()
    p = TaxaDiffusionPipeline(bb.unet.eval(), make_scheduler("ddim", bb.noise_scheduler.config),
                              bb.text_encoder, bb.tokenizer, cond, None, Taxonomy(RANKS, LINEAGES))
    p.set_progress_bar_config(disable=True)
    return p


def _run(pipe, **kw):
    args = dict(num_images=4, num_inference_steps=4, output_type="pt", seed=7, guidance_scale=3.0)
    return pipe("Corvus corax", **{**args, **kw}).images


def test_images_do_not_depend_on_batch_size(pipe):
    a = _run(pipe, batch_size=4)
    b = _run(pipe, batch_size=1)
    c = _run(pipe, batch_size=3)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=0)
    # image i is image i whatever the request size: the first two of four equal a request of two
    torch.testing.assert_close(_run(pipe, num_images=2), a[:2], atol=1e-5, rtol=0)
    assert not torch.allclose(a[0], a[1])  # different images get different noise
    assert image_seed(7, 0) != image_seed(7, 1) and image_seed(0, 1) != image_seed(1, 0)


def test_stochastic_sampler_is_batch_independent_too(pipe):
    old = pipe.scheduler
    pipe.scheduler = make_scheduler("ddpm", old.config)
    try:
        torch.testing.assert_close(_run(pipe, batch_size=4), _run(pipe, batch_size=1), atol=1e-5, rtol=0)
    finally:
        pipe.scheduler = old


def test_save_load_round_trip_is_bit_exact(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    files = {f.relative_to(tmp_path / "p").as_posix() for f in (tmp_path / "p").rglob("*") if f.is_file()}
    assert "pytorch_lora_weights.safetensors" in files and "conditioner/config.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".pth")) for f in files)  # no pickle anywhere
    from safetensors.torch import load_file
    lora = load_file(tmp_path / "p" / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("unet.") for k in lora)  # diffusers' LoRA format
    back = TaxaDiffusionPipeline.from_pretrained(tmp_path / "p")
    back.set_progress_bar_config(disable=True)
    assert back.taxonomy == pipe.taxonomy
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"] and index["vae"] == [None, None]
    assert index["sample_defaults"]["scheduler"] == back.sample_config.scheduler == "ddim"  # as saved
    assert torch.equal(_run(pipe), _run(back))


def test_num_images_per_prompt_and_its_alias(pipe):
    a = _run(pipe, num_images=None, num_images_per_prompt=3)
    assert a.shape == (3, 3, 16, 16)
    assert torch.equal(a, _run(pipe, num_images=3))
    assert _run(pipe, num_images=None).shape[0] == 1  # neither: one image
    with pytest.raises(ValueError, match="alias"):
        _run(pipe, num_images=2, num_images_per_prompt=3)


def test_one_generator_gives_reproducible_batch_independent_images(pipe):
    kw = dict(num_images=None, seed=None, num_images_per_prompt=3)
    a = _run(pipe, generator=torch.Generator().manual_seed(5), batch_size=3, **kw)
    b = _run(pipe, generator=torch.Generator().manual_seed(5), batch_size=1, **kw)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # the same seed drawn, one generator per image
    g = torch.Generator().manual_seed(5)
    drawn = int(torch.randint(0, 2**63 - 1, (1,), generator=g).item())
    assert torch.equal(a, _run(pipe, seed=drawn, num_images=3, batch_size=3))  # documented derivation
    g = torch.Generator().manual_seed(5)
    first, second = (_run(pipe, generator=g, batch_size=3, **kw) for _ in range(2))
    assert torch.equal(first, a) and not torch.allclose(first, second)  # the generator advances
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    assert _run(pipe, generator=gens, **kw).shape[0] == 3  # a list: one per image, as before
    with pytest.raises(ValueError, match="not both"):
        _run(pipe, generator=torch.Generator().manual_seed(5))  # _run passes seed=7


def test_output_types(pipe):
    kw = dict(num_images=2, num_inference_steps=2)
    pt = _run(pipe, **kw)
    assert pt.shape == (2, 3, 16, 16) and pt.dtype == torch.float32 and 0 <= pt.min() <= pt.max() <= 1
    np_ = _run(pipe, output_type="np", **kw)
    assert isinstance(np_, np.ndarray) and np_.shape == (2, 16, 16, 3)
    assert np.array_equal(np_, pt.permute(0, 2, 3, 1).numpy())
    pil = _run(pipe, output_type="pil", **kw)
    assert [im.size for im in pil] == [(16, 16)] * 2
    u8 = _run(pipe, output_type="uint8", **kw)
    assert np.array_equal(np.stack([np.asarray(im) for im in pil]), u8.permute(0, 2, 3, 1).numpy())
    lat = _run(pipe, output_type="latent", **kw)  # undecoded: pixel space here, not clamped to [-1, 1]
    assert torch.equal(lat.clamp(-1, 1) / 2 + 0.5, pt)
    with pytest.raises(ValueError, match="output_type"):
        _run(pipe, output_type="png")


def test_call_defaults_are_the_sample_config(pipe):
    assert pipe.sample_config == SampleConfig()  # built in code: the paper's defaults
    custom = TaxaDiffusionPipeline(pipe.unet, pipe.scheduler, pipe.text_encoder, pipe.tokenizer,
                                   pipe.conditioner, None, pipe.taxonomy,
                                   sample_defaults={"guidance": "cfg", "scale": 2.0, "steps": 3})
    custom.set_progress_bar_config(disable=True)
    steps = []
    out = custom("Corvus corax", seed=1, output_type="pt",
                 callback_on_step_end=lambda p, i, t, kw: steps.append(i)).images
    assert steps == [0, 1, 2]
    assert torch.equal(out, pipe("Corvus corax", seed=1, output_type="pt", guidance="cfg",
                                 guidance_scale=2.0, num_inference_steps=3).images)
    assert custom.config.sample_defaults["scale"] == 2.0  # registered: model_index.json gets it


def test_reference_and_condition_share_one_unet_call(pipe):
    calls = []
    orig = pipe.unet.forward

    def spy(x, t, ctx, *a, **k):
        calls.append((x.shape[0], ctx))
        return orig(x, t, ctx, *a, **k)

    pipe.unet.forward = spy
    try:
        _run(pipe, num_images=2, guidance="taxa", num_inference_steps=3)
    finally:
        pipe.unet.forward = orig
    assert len(calls) == 3 and all(b == 4 for b, _ in calls)
    ctx = calls[0][1]
    names = pipe.resolve_taxon("Corvus corax")
    torch.testing.assert_close(ctx[0], pipe.context(names[:1]))     # TaxaGuide: level 0 reference
    torch.testing.assert_close(ctx[2], pipe.context(names))          # the full lineage
    assert not torch.allclose(ctx[0], pipe.context(()))


def test_guidance_modes_and_interval_change_the_result(pipe):
    base = _run(pipe, guidance="taxa")
    assert not torch.allclose(base, _run(pipe, guidance="cfg"))
    assert not torch.allclose(base, _run(pipe, guidance="none"))
    assert not torch.allclose(base, _run(pipe, guidance="taxa", guide_level=3))
    torch.testing.assert_close(_run(pipe, guidance="taxa", guidance_interval=(0.0, 0.0)),
                               _run(pipe, guidance="none"))


def test_unknown_taxon_lists_closest_names(pipe):
    with pytest.raises(KeyError, match="Corvus corax"):
        pipe("Corvus coraxx", num_inference_steps=1)
    with pytest.raises(KeyError, match="Aves"):
        pipe("Avess > Passeriformes > Corvidae", num_inference_steps=1)


def test_unseen_species_uses_known_ancestors_and_its_own_prompt(pipe):
    names = pipe.resolve_taxon("Aves > Passeriformes > Corvidae > Corvus > novus")
    assert pipe.known_depth(names) == 4
    prompts = pipe._prompts(names)
    assert prompts[-1] == "species: Corvus novus"
    out = pipe("Aves > Passeriformes > Corvidae > Corvus > novus", num_images=1, num_inference_steps=2,
               output_type="pt").images
    assert out.shape == (1, 3, 16, 16)
    assert not torch.allclose(pipe.context(names), pipe.context(pipe.resolve_taxon("Corvus corax")))


def test_levels_and_every_scheduler(pipe):
    fam = pipe("Corvus corax", level="family", num_images=1, num_inference_steps=2, output_type="uint8")
    assert fam.images.dtype == torch.uint8 and fam.images.shape == (1, 3, 16, 16)
    for name in SCHEDULERS:
        pipe_s = TaxaDiffusionPipeline(pipe.unet, make_scheduler(name, pipe.scheduler.config),
                                       pipe.text_encoder, pipe.tokenizer, pipe.conditioner, None,
                                       pipe.taxonomy)
        pipe_s.set_progress_bar_config(disable=True)
        img = pipe_s("Poecile atricapillus", num_images=1, num_inference_steps=3, output_type="pt").images
        assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all(), name
