"""The pretrained tiny base: trait captions, pretraining output, and the checks when loading it."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from taxadiffusion.backbone import build_tiny
from taxadiffusion.config import ModelConfig
from taxadiffusion.tinybase import caption, pretrain, random_rows

SMALL = ModelConfig(base="tiny", block_out_channels=[16, 32], cross_attn_levels=[False, True],
                    text_width=32, beta_schedule="squaredcos_cap_v2")


def test_caption_names_every_rank_trait_in_words():
    row = np.array([3, 8, 0, 1, 11])  # egg body, long + round tail, pattern 1 (bands dark), mark 11
    text = caption(row, hue0=0.0)
    assert text.startswith("egg fish, long body, round tail, red, ")
    assert "dark bands" in text and text.endswith("contrast dot rear bottom")
    assert caption(np.array([0, 0, 0, 0, 0]), 0.0).split(", ")[4] == "plain"
    rows = random_rows(np.random.default_rng(0), 500)
    assert rows.shape == (500, 5) and len({caption(r, 0.3) for r in rows}) > 400  # varied


def test_pretrained_base_loads_and_is_checked(tmp_path):
    out = pretrain(SMALL, steps=3, out=tmp_path / "base", batch_size=4)
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["steps"] == 3 and recipe["model"]["block_out_channels"] == [16, 32]
    cfg = dataclasses.replace(SMALL, pretrained_unet=str(out))
    bb = build_tiny(cfg, 32, seed=99)  # the seed is overridden: the base fixes the text encoder
    saved = load_file(out / "unet.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in bb.unet.state_dict().items())
    with pytest.raises(ValueError, match="text_width"):
        build_tiny(dataclasses.replace(cfg, text_width=64), 32)
    recipe["text_encoder_fingerprint"] = "0" * 16
    (out / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(ValueError, match="fingerprint"):
        build_tiny(cfg, 32)
    with pytest.raises(FileNotFoundError, match="taxadiffusion.tinybase"):
        build_tiny(dataclasses.replace(SMALL, pretrained_unet=str(tmp_path / "nothing")), 32)


def test_continued_pretraining_starts_from_the_parent_and_records_it(tmp_path):
    parent = pretrain(SMALL, steps=2, out=tmp_path / "parent", batch_size=4)
    # lr 0: the continued run must hold exactly the parent's weights (it did start from them)
    same = pretrain(SMALL, steps=2, out=tmp_path / "same", batch_size=4, lr=0.0, init=parent)
    a, b = load_file(parent / "unet.safetensors"), load_file(same / "unet.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    child = pretrain(SMALL, steps=2, out=tmp_path / "child", batch_size=4, seed=7, snr_gamma=5.0,
                     init=parent)
    recipe = json.loads((child / "recipe.json").read_text())
    assert recipe["init"]["steps"] == 2 and recipe["init"]["init"] is None  # the chain is on record
    assert recipe["snr_gamma"] == 5.0 and recipe["seed"] == 7
    c = load_file(child / "unet.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)  # it trained
    # the same run without min-SNR weighting ends elsewhere: the weighting reaches the loss
    plain = pretrain(SMALL, steps=2, out=tmp_path / "plain", batch_size=4, seed=7, init=parent)
    p = load_file(plain / "unet.safetensors")
    assert any(not torch.equal(p[k], c[k]) for k in p)
    # a parent made for another architecture is refused, as any base is (backbone.load_tiny_base)
    with pytest.raises(ValueError, match="text_width"):
        pretrain(dataclasses.replace(SMALL, text_width=64), steps=1, out=tmp_path / "x", init=parent)


def test_shipped_bases_are_named_and_the_continued_one_records_its_chain():
    """`builtin-3600` (README ninth set) is the shipped base trained 3 x 1,200 steps further: it loads
    into the demo's architecture, differs from `builtin`, and its recipe names each link back to it."""
    from taxadiffusion.config import load_config
    from taxadiffusion.backbone import ASSET, BUILTIN, base_dir
    from taxadiffusion.tinybase import open_base
    assert base_dir("builtin") == ASSET and base_dir("/some/folder") == Path("/some/folder")
    cfg = load_config("demo", ["model.pretrained_unet=builtin-3600"]).model
    chain, r = [], json.loads((BUILTIN["builtin-3600"] / "recipe.json").read_text())
    while r:
        chain.append((r["seed"], r["steps"]))
        r = r.get("init")
    assert chain == [(1237, 1200), (1236, 1200), (1235, 1200), (1234, 3500)]
    assert chain[-1] == (json.loads((ASSET / "recipe.json").read_text())["seed"],
                         json.loads((ASSET / "recipe.json").read_text())["steps"])
    continued = build_tiny(cfg, 32).unet.state_dict()
    shipped = build_tiny(dataclasses.replace(cfg, pretrained_unet="builtin"), 32).unet.state_dict()
    saved = load_file(BUILTIN["builtin-3600"] / "unet.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in continued.items())
    assert any(not torch.equal(v, shipped[k]) for k, v in continued.items())
    # open_base (the benchmarks' way in) builds the same model from the base's recipe, with a text cache
    bb, cache = open_base("builtin-3600")
    assert all(torch.equal(v, saved[k]) for k, v in bb.unet.state_dict().items())
    assert cache.encode(["red fish"]).shape == (1, 77, cfg.text_width)
