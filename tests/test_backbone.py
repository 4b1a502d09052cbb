"""Backbone: the SD v1.5 parameter counts of paper Table S1, the offline CLIP tokenizer, errors."""
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel

from taxadiffusion.backbone import (SD15_UNET_CONFIG, add_lora, build_tiny, clip_tokenizer,
                                    lora_parameters, resolve_sd15)
from taxadiffusion.config import ModelConfig, load_config
from taxadiffusion.conditioning import TaxonomyConditioner


def _trunc2(x: float) -> float:
    return int(x * 100) / 100


def test_table_s1_parameter_counts():
    """SD v1.5 UNet built from its config (no weights; meta tensors) with the FishNet preset."""
    cfg = load_config("sd15-fishnet")
    assert cfg.data.ranks == ["class", "order", "family", "genus", "species"]
    m = cfg.model
    with init_empty_weights():
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        n_unet = sum(p.numel() for p in unet.parameters())
        add_lora(unet, m)
        n_lora = sum(p.numel() for p in lora_parameters(unet))
        cond = TaxonomyConditioner(len(cfg.data.ranks), 768, m.level_layers, m.level_heads,
                                   m.level_ff, m.level_dropout, m.zero_init)
        n_cond = sum(p.numel() for p in cond.parameters())
    assert n_unet == 859_520_964                 # paper: 859.52M
    assert n_lora == 797_184                     # paper: 0.80M
    assert n_cond == 5 * 11_027_968              # 11.03M per level (REFERENCE-FACTS.md)
    trainable, total = n_lora + n_cond, n_unet + n_lora + n_cond
    assert trainable == 55_937_024 and total == 915_457_988
    # The paper prints these truncated to two decimals: 55.93M and 915.45M (rounding gives .94/.46)
    assert (_trunc2(trainable / 1e6), _trunc2(total / 1e6)) == (55.93, 915.45)
    assert round(n_lora / 1e6, 2) == 0.80 and round((n_unet + n_lora) / 1e6, 2) == 860.32


def test_tokenizer_matches_open_clip():
    import open_clip
    tok = clip_tokenizer()
    for s in ["genus: Chaetodon", "species: Chaetodon auriga", "a photo of Animalia Chordata."]:
        ours = tok(s).input_ids
        ref = open_clip.tokenize([s])[0].tolist()
        assert ours == ref[: ref.index(49407) + 1]
    padded = tok("class: Aves", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407  # SD v1.5 pads with <|endoftext|>


def test_tiny_backbone_is_deterministic_per_seed():
    cfg = ModelConfig(base="tiny")
    a, b = build_tiny(cfg, 32, seed=3), build_tiny(cfg, 32, seed=3)
    for (n, p), (_, q) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert torch.equal(p, q), n
    c = build_tiny(cfg, 32, seed=4)
    assert not torch.equal(next(a.text_encoder.parameters()), next(c.text_encoder.parameters()))
    assert a.noise_scheduler.config.beta_schedule == cfg.beta_schedule


def test_missing_sd15_weights_error_names_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        resolve_sd15("nobody/not-a-cached-model")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as e:
        resolve_sd15(str(tmp_path))
    msg = str(e.value)
    assert "unet/diffusion_pytorch_model.safetensors" in msg and "text_encoder/model.safetensors" in msg


def test_unit_token_init_keeps_each_taxon_name_visible_in_the_tiny_context():
    """CLIP's init (token std 0.02) lets the random layers' attention average (about 0.5 per channel)
    swamp each token's identity, so different names give nearly the same context; a token std of 1
    keeps the name. Measured: the share of variance across the 8 family prompts of the synthetic
    world at the name positions."""
    from taxadiffusion.backbone import tiny_text_encoder
    from taxadiffusion.datasets.synthetic import WorldConfig, make_world
    tx = make_world(WorldConfig()).taxonomy
    level = tx.ranks.index("family")
    prompts = [tx.prompt(tx.taxon(level, i)) for i in range(tx.size(level))]
    ids = clip_tokenizer()(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids

    def name_share(std):
        torch.manual_seed(0)
        te = tiny_text_encoder(ModelConfig(base="tiny", text_token_std=std)).eval()
        assert std is None or abs(te.embeddings.token_embedding.weight.std().item() - std) < 0.01
        with torch.no_grad():
            e = te(ids).last_hidden_state[:, 3:8]  # after <bos> "family" ":", the name's tokens
        return float(((e - e.mean(0)) ** 2).sum() / (e ** 2).sum())

    clip_init, unit = name_share(None), name_share(1.0)
    assert clip_init < 0.3 and unit > 0.5, (clip_init, unit)


def test_min_snr_weight_caps_the_nearly_clean_steps_only():
    from taxadiffusion.backbone import min_snr_weight, noise_scheduler
    sched = noise_scheduler(ModelConfig(base="tiny", beta_schedule="squaredcos_cap_v2"), True)
    t = torch.tensor([0, 50, 300, 600, 999])
    abar = sched.alphas_cumprod[t]
    snr = abar / (1 - abar)
    w = min_snr_weight(sched, t, 5.0)
    assert torch.allclose(w, torch.where(snr > 5, 5 / snr, torch.ones_like(snr)))
    assert w[0] < 0.01 and w[-1] == 1.0  # t=0 is almost clean (SNR ~ 1e3); t=999 is noise
    assert torch.equal(min_snr_weight(sched, t, None), torch.ones(5))
