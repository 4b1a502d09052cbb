"""FID/KID: torch-fidelity's Inception at random init, the feature cache, per-level grouping, errors."""
from __future__ import annotations

import json

import pytest
import torch

from taxadiffusion.evaluation import fid
from taxadiffusion.evaluation.weights import MissingWeightsError, file_identity
from taxadiffusion.taxonomy import Taxonomy


@pytest.fixture(scope="module")
def inception_pth(tmp_path_factory):
    """torch-fidelity's FID Inception architecture at random init, saved as a .pth state dict.

    Its constructor always loads weights, so the load is stubbed while building it. PyTorch's default
    conv init shrinks activations to ~1e-8 over Inception's depth (a degenerate test); He init keeps
    them O(1)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with pytest.MonkeyPatch.context() as m:
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, strict=True: None)
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for mod in net.modules():
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / fid.INCEPTION_FILE
    torch.save(net.state_dict(), path)
    return path


def _images(n, seed, size=32):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def test_missing_weights_error_names_file_places_and_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(MissingWeightsError) as e:
        fid.inception_weights_path(tmp_path / "nope.pth")
    msg = str(e.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in msg
    assert str(tmp_path / "nope.pth") in msg
    assert str(tmp_path / "th" / "hub" / "checkpoints" / fid.INCEPTION_FILE) in msg
    assert fid.URL_INCEPTION_V3 in msg and "Nothing is downloaded" in msg
    with pytest.raises(MissingWeightsError):
        fid.inception_features(_images(1, 0))


def test_cache_location_is_torch_hub(tmp_path, monkeypatch, inception_pth):
    target = tmp_path / "hub" / "checkpoints" / fid.INCEPTION_FILE
    target.parent.mkdir(parents=True)
    target.write_bytes(inception_pth.read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert fid.inception_weights_path() == target
    assert fid.inception_identity()["sha256"] == file_identity(inception_pth)["sha256"]


@pytest.fixture(scope="module")
def six(inception_pth):
    """Six random 32x32 images, the same brightened by 60, and their features (computed once)."""
    imgs = _images(6, 0)
    shifted = (imgs.int() + 60).clamp(0, 255).to(torch.uint8)
    return imgs, fid.inception_features(imgs, inception_pth, batch_size=4), \
        fid.inception_features(shifted, inception_pth)


def test_features_fid_self_zero_shift_positive(inception_pth, six):
    imgs, f, f2 = six
    assert f.shape == (6, 2048) and f.dtype == torch.float32 and f.std() > 0.01
    # batch composition does not change an image's features
    assert torch.allclose(f[:2], fid.inception_features(imgs[:2], inception_pth, batch_size=1), atol=1e-5)
    same, other = fid.fid_kid(f, f), fid.fid_kid(f, f2)
    assert other["fid"] > 1.0 and abs(same["fid"]) < 1e-6 * other["fid"]
    assert other["kid_mean"] > 100 * abs(same["kid_mean"])
    assert same["fid_small_n"] and same["n_gen"] == same["n_real"] == 6 and same["dims"] == 2048


def test_bad_images_and_bad_weights_are_errors(tmp_path, inception_pth):
    with pytest.raises(ValueError, match="uint8"):
        fid.inception_features(torch.rand(2, 3, 8, 8), inception_pth)
    bad = tmp_path / "bad.pth"
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a valid FID Inception state dict"):
        fid.load_inception(bad)


def test_kid_small_n_and_fid_undefined():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 16, generator=g), torch.randn(7, 16, generator=g) + 1
    r = fid.fid_kid(a, b, kid_subset_size=1000, kid_subsets=20)
    assert r["kid_subset_size"] == 5 and r["kid_subsets"] == 20 and r["kid_mean"] > 0
    assert r["fid_small_n"] and r["fid"] > 0
    big = fid.fid_kid(torch.randn(40, 16, generator=g), torch.randn(40, 16, generator=g))
    assert not big["fid_small_n"] and big["kid_subsets"] == 1  # subset = every sample: one draw
    one = fid.fid_kid(a[:1], b)
    assert one["fid"] is None and one["kid_mean"] is None and "fewer than 2" in one["note"]


def test_reference_cache_second_call_does_not_recompute(tmp_path, inception_pth, monkeypatch):
    imgs = {f"img{i}": im for i, im in enumerate(_images(6, 3))}
    reads: list[list[str]] = []

    def read(ids):
        reads.append(list(ids))
        return torch.stack([imgs[i] for i in ids])

    calls = []
    real_fn = fid.inception_features
    monkeypatch.setattr(fid, "inception_features", lambda *a, **k: calls.append(1) or real_fn(*a, **k))
    kw = dict(cache_dir=tmp_path, dataset_id="cub/v1", split="test", resolution=32, weights=inception_pth,
              batch_size=3)
    first = fid.reference_features(["img0", "img1", "img2", "img3"], read, **kw)
    assert reads == [["img0", "img1", "img2"], ["img3"]] and len(calls) == 2
    again = fid.reference_features(["img3", "img0"], read, **kw)
    assert len(reads) == 2 and len(calls) == 2            # nothing read, nothing recomputed
    assert torch.equal(again, first[[3, 0]])
    more = fid.reference_features(["img5", "img1", "img4"], read, **kw)
    assert reads[2:] == [["img5", "img4"]] and torch.equal(more[1], first[1])
    (meta,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert meta["ids"] == ["img0", "img1", "img2", "img3", "img5", "img4"]
    assert meta["key"]["resolution"] == 32 and meta["key"]["split"] == "test"
    assert meta["key"]["extractor_sha256"] == file_identity(inception_pth)["sha256"]
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    # another split is another cache; a wrong image size is an error naming the ids
    fid.reference_features(["img0"], read, **{**kw, "split": "val"})
    assert len(list(tmp_path.glob("*.json"))) == 2
    with pytest.raises(ValueError, match="expected \\(1, 3, 64, 64\\)"):
        fid.reference_features(["img0"], read, **{**kw, "resolution": 64})


RANKS = ("class", "order", "family", "genus", "species")
LINEAGES = [("Aves", "Passeriformes", "Corvidae", "Pica", "hudsonia"),
            ("Aves", "Passeriformes", "Corvidae", "Pica", "pica"),
            ("Aves", "Passeriformes", "Corvidae", "Corvus", "corax"),
            # the genus name "Pica" reused in another family: a different taxon
            ("Aves", "Piciformes", "Picidae", "Pica", "fakea")]


def test_fid_by_level_grouping_balance_and_skips():
    tax = Taxonomy(RANKS, LINEAGES)
    sp = {t.path[-1]: t for t in tax.species}
    pica = tax.lookup("Aves > Passeriformes > Corvidae > Pica")
    pica2 = tax.lookup("Aves > Piciformes > Picidae > Pica")
    corvus = tax.lookup("Corvus", rank="genus")
    g = torch.Generator().manual_seed(0)
    feats = lambda n, shift=0.0: torch.randn(n, 8, generator=g) + shift  # noqa: E731
    gen = {pica: feats(6), corvus: feats(4), pica2: feats(3),
           sp["hudsonia"]: feats(12), sp["pica"]: feats(12), sp["corax"]: feats(12)}
    real = {sp["hudsonia"]: feats(15), sp["pica"]: feats(2), sp["corax"]: feats(12)}  # no fakea
    with pytest.raises(ValueError, match="feature_source"):
        fid.fid_by_level(gen, real, ["genus"])
    src = {"name": "synthetic test features"}
    r = fid.fid_by_level(gen, real, ["genus", "species"], feature_source=src, per_taxon_min=10)
    genus, species = r["levels"]["genus"], r["levels"]["species"]
    # Corvidae's Pica pools hudsonia + pica (17 real); the Picidae Pica has none and is skipped
    assert genus["n_taxa"] == 2 and genus["n_gen"] == genus["n_real"] == min(6, 17) + min(4, 12)
    assert species["n_taxa"] == 3 and species["n_gen"] == species["n_real"] == 12 + 2 + 12
    assert [(s["taxon"], s["reason"]) for s in r["skipped"]] == [(pica2, "no real images under this taxon")]
    # per taxon only with >= 10 a side; counts are reported either way
    assert r["per_taxon"][sp["hudsonia"]]["fid"] is not None
    assert r["per_taxon"][sp["pica"]]["fid"] is None and r["per_taxon"][sp["pica"]]["n_real"] == 2
    assert r["per_taxon"][pica]["n_real"] == 17
    allr = fid.fid_by_level(gen, real, [3], feature_source=src, balance="all", per_taxon_min=None)
    assert allr["levels"]["genus"]["n_gen"] == 10 and allr["levels"]["genus"]["n_real"] == 29
    assert allr["per_taxon"] == {}
    # reproducible, and the seed changes which images are kept
    again = fid.fid_by_level(gen, real, ["genus"], feature_source=src, per_taxon_min=None)
    assert again["levels"]["genus"]["fid"] == r["levels"]["genus"]["fid"]
    other = fid.fid_by_level(gen, real, ["genus"], feature_source=src, per_taxon_min=None, seed=5)
    assert other["levels"]["genus"]["fid"] != r["levels"]["genus"]["fid"]
    assert r["provenance"]["weights"]["inception"] == src and r["provenance"]["library"] == "torch-fidelity"
    with pytest.raises(ValueError, match="no generated taxa at rank 'family'"):
        fid.fid_by_level(gen, real, ["family"], feature_source=src)


def test_fid_by_level_from_images(inception_pth, six, monkeypatch):
    """Images go through the Inception once per side; the pooled features are the images' features."""
    imgs, f, _ = six
    tax = Taxonomy(RANKS, LINEAGES[:2])
    a, b = tax.species
    seen = []
    monkeypatch.setattr(fid, "fid_kid", lambda g, r, **k: seen.append((g, r)) or {"fid": 1.0})
    r = fid.fid_by_level({a: imgs[:1], b: imgs[1:2]}, {a: imgs[2:4], b: imgs[4:5]},
                         weights=inception_pth, per_taxon_min=None)
    (g, rr), = seen
    assert torch.allclose(g, f[:2], atol=1e-5) and rr.shape == (2, 2048)  # matched: 1 + 1 real
    assert any(torch.allclose(rr[0], f[k], atol=1e-5) for k in (2, 3))
    assert torch.allclose(rr[1], f[4], atol=1e-5)
    prov = r["provenance"]
    assert r["levels"]["species"]["n_taxa"] == 2 and r["levels"]["species"]["fid"] == 1.0
    assert prov["weights"]["inception"]["sha256"] == file_identity(inception_pth)["sha256"]
    assert prov["settings"]["generated_image_sizes"] == ["32x32"] and prov["library_version"] == "0.4.0"
    # features from another extractor cannot be compared with images through this one
    with pytest.raises(ValueError, match="one extractor per comparison"):
        fid.fid_by_level({a: imgs[:1]}, {a: f[2:4]}, weights=inception_pth,
                         feature_source={"sha256": "0" * 64})
