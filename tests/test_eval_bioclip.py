"""BioCLIP: file look-up (HF cache layout, local dir), errors, score definition, zero-shot top-1."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file
from torchvision.transforms.functional import to_pil_image

from taxadiffusion.evaluation import bioclip as bc
from taxadiffusion.evaluation.weights import MissingWeightsError
from taxadiffusion.taxonomy import Taxonomy

# A tiny open_clip config in BioCLIP's layout (open_clip_config.json: model_cfg + preprocess_cfg)
TINY = {"model_cfg": {"embed_dim": 32,
                      "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
                      "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                                   "layers": 1}},
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711]}}

RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
TAX = Taxonomy(RANKS, [("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica", "hudsonia"),
                       ("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Pica", "pica"),
                       ("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "corax")])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinyclip")
    (d / bc.CONFIG_FILE).write_text(json.dumps(TINY))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{d}", load_weights=False)
    save_file(model.state_dict(), str(d / "open_clip_model.safetensors"))
    return d


def _images(n, seed, size=40):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def test_missing_files_errors(tmp_path):
    with pytest.raises(MissingWeightsError) as e:
        bc.load_bioclip(bc.BIOCLIP, cache_dir=tmp_path)
    msg = str(e.value)
    assert "open_clip_config.json" in msg and "open_clip_pytorch_model.bin" in msg
    assert str(tmp_path / "models--imageomics--bioclip" / "snapshots") in msg
    assert "huggingface-cli download imageomics/bioclip" in msg and "Nothing is downloaded" in msg
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / bc.CONFIG_FILE).write_text("{}")
    with pytest.raises(MissingWeightsError, match="open_clip_model.safetensors") as e:
        bc.load_bioclip(tmp_path / "dir")
    assert str(tmp_path / "dir" / "open_clip_pytorch_model.bin") in str(e.value)


def test_loads_local_dir_and_hf_cache_layout(tiny_dir, tmp_path):
    b = bc.load_bioclip(f"local-dir:{tiny_dir}", device="cpu")
    saved = load_file(str(tiny_dir / "open_clip_model.safetensors"))
    assert torch.equal(b.model.state_dict()["text_projection"], saved["text_projection"])
    assert b.identity["weights"]["file"] == "open_clip_model.safetensors"
    # the Hugging Face cache layout: models--org--name/{refs/main, snapshots/<rev>/files}
    repo = tmp_path / "models--imageomics--bioclip"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    for f in (bc.CONFIG_FILE, "open_clip_model.safetensors"):
        (snap / f).write_bytes((tiny_dir / f).read_bytes())
    assert bc.bioclip_files(bc.BIOCLIP, cache_dir=tmp_path) == (snap / bc.CONFIG_FILE,
                                                                 snap / "open_clip_model.safetensors")
    h = bc.load_bioclip(bc.BIOCLIP, cache_dir=tmp_path, device="cpu")
    assert h.identity["weights"]["sha256"] == b.identity["weights"]["sha256"]


def test_score_definition_with_vit_b16_random_init():
    """Same architecture as BioCLIP (ViT-B-16) at random init: the score is 100 * max(cos, 0)."""
    torch.manual_seed(0)
    model, _, pre = open_clip.create_model_and_transforms("ViT-B-16")
    tok = open_clip.get_tokenizer("ViT-B-16")
    calls = []
    b = bc.Bioclip(model.eval(), pre, lambda t: calls.append(list(t)) or tok(t), {"test": "random init"})
    pica, corax = TAX.lookup("Pica pica"), TAX.lookup("Corvus corax")
    images = {pica: _images(2, 1), corax: _images(1, 2)}
    r = bc.bioclip_eval(b, images, TAX)
    assert calls == [[TAX.bioclip_text(t) for t in sorted(images)]]  # evaluated species, once each
    with torch.no_grad():  # independently: open_clip's encoders, plain cosine, one batch each
        order = [t for t in images for _ in range(len(images[t]))]
        fi = model.encode_image(torch.stack([pre(to_pil_image(im)) for t in images for im in images[t]]))
        ft = model.encode_text(tok([TAX.bioclip_text(t) for t in order]))
    per_image = 100 * torch.nn.functional.cosine_similarity(fi, ft).clamp(min=0)
    for t in images:
        want = per_image[[k for k, o in enumerate(order) if o == t]].mean()
        e = r["per_species"][t]
        assert e["score"] == pytest.approx(float(want), abs=1e-3) and 0 <= e["score"] <= 100
        assert e["n"] == len(images[t])
    assert r["per_species"][pica]["text"] == ("a photo of Animalia Chordata Aves Passeriformes "
                                               "Corvidae Pica pica.")
    assert r["n_images"] == 3 and r["n_candidates"] == 2
    assert "unpublished" in bc.__doc__ and "does not publish" in r["provenance"]["definition"]


def test_score_clamps_negative_cosine():
    img = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]])
    assert bc.bioclip_score(img, torch.tensor([[1.0, 0.0]])).tolist() == pytest.approx([100, 60, 0])


def test_zero_shot_top1_on_constructed_embeddings(tiny_dir, monkeypatch):
    b = bc.load_bioclip(tiny_dir, device="cpu")
    b = bc.Bioclip(b.model, b.preprocess, lambda t: pytest.fail("texts must come from the cache"),
                   b.identity)
    sp = sorted(TAX.species)
    e = torch.eye(32)
    for k, t in enumerate(sp):
        b.text_cache[TAX.bioclip_text(t)] = e[k]
    # images of sp[0] embed at (e0, e1): one right, one wrong; sp[1] at (e1, e1); sp[2] at e0 (wrong)
    feats = {0: e[[0, 1]], 1: e[[1, 1]], 2: e[[0]]}
    images = {t: _images(len(feats[k]), k) for k, t in enumerate(sp)}
    lookup = {id(images[t]): feats[k] for k, t in enumerate(sp)}
    monkeypatch.setattr(bc, "image_embeddings", lambda bio, ims, bs=64: lookup[id(ims)])
    r = bc.bioclip_eval(b, images, TAX)
    top1 = [r["per_species"][t]["top1"] for t in sp]
    assert top1 == [0.5, 1.0, 0.0]
    assert r["top1_over_images"] == pytest.approx(3 / 5)
    assert r["top1_mean_over_species"] == pytest.approx(0.5)
    assert [r["per_species"][t]["score"] for t in sp] == pytest.approx([50, 100, 0])
    # restricting candidates to fewer species than evaluated is an error
    with pytest.raises(ValueError, match="candidates lack"):
        bc.bioclip_eval(b, images, TAX, candidates=sp[:2])


def test_real_embeddings_shapes_and_text_cache(tiny_dir):
    b = bc.load_bioclip(tiny_dir, device="cpu")
    calls, tok = [], b.tokenizer
    b = bc.Bioclip(b.model, b.preprocess, lambda t: calls.append(list(t)) or tok(t), b.identity)
    t1 = bc.text_embeddings(b, ["x.", "y.", "x."])
    t2 = bc.text_embeddings(b, ["y.", "z."])
    assert calls == [["x.", "y."], ["z."]] and torch.equal(t1[1], t2[0]) and torch.equal(t1[0], t1[2])
    emb = bc.image_embeddings(b, _images(3, 0, size=50), batch_size=2)
    assert emb.shape == (3, 32) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        bc.image_embeddings(b, torch.rand(1, 3, 8, 8))
