"""LPIPS: random-init AlexNet trunk + the wheel's linear layers; distances, pair formation, errors."""
from __future__ import annotations

import lpips as lpips_lib
import pytest
import torch
import torchvision

from taxadiffusion.evaluation import lpips as lp
from taxadiffusion.evaluation.weights import MissingWeightsError
from taxadiffusion.taxonomy import Taxonomy

RES = 64  # small LPIPS resolution keeps AlexNet cheap on CPU


@pytest.fixture(scope="module")
def alexnet_pth(tmp_path_factory):
    """torchvision's AlexNet at random init, saved under torchvision's checkpoint file name."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("alexnet") / lp.ALEXNET_FILE
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def model(alexnet_pth):
    return lp.load_lpips(alexnet_pth, device="cpu")


def _images(n, seed, size=48):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def test_missing_alexnet_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError) as e:
        lp.load_lpips(tmp_path / "mine.pth")
    msg = str(e.value)
    assert "alexnet-owt-7be5be79.pth" in msg and str(tmp_path / "mine.pth") in msg
    assert str(tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in msg
    assert lp.ALEXNET_URL in msg and "Nothing is downloaded" in msg


@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")
def test_trunk_loading_equals_lpips_own_pretrained_path(alexnet_pth, model, monkeypatch):
    """Our slice-by-slice copy gives the network lpips builds itself from the same trunk file."""
    sd = torch.load(alexnet_pth, weights_only=True)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", lambda *a, **k: sd)
    ref = lpips_lib.LPIPS(net="alex", version="0.1", pnet_rand=False, verbose=False).eval()
    a, b = _images(2, 1), _images(2, 2)
    with torch.no_grad():
        want = ref(lp._prep(a, RES, "a"), lp._prep(b, RES, "b")).flatten()
    got = lp.lpips_distance(model, a, b, resolution=RES)
    assert torch.allclose(got, want, atol=1e-6)
    assert model.identity["alexnet"]["file"] == lp.ALEXNET_FILE
    assert model.identity["lpips_linear"]["path"].endswith("v0.1/alex.pth")


def test_identical_zero_different_positive(model):
    a, b = _images(3, 1), _images(3, 2)
    same = lp.lpips_distance(model, a, a, resolution=RES)
    diff = lp.lpips_distance(model, a, b, resolution=RES, batch_size=2)
    assert same.shape == (3,) and torch.all(same.abs() < 1e-6)
    assert torch.all(diff > 1e-3)
    with pytest.raises(ValueError, match="uint8"):
        lp.lpips_distance(model, a.float(), b, resolution=RES)


RANKS = ("genus", "species")
TAX = Taxonomy(RANKS, [("Pica", "pica"), ("Pica", "hudsonia"), ("Corvus", "corax")])


def test_fidelity_pairs_seed_and_skips(model):
    sp = {t.name: t for t in TAX.species}
    gen = {sp["pica"]: _images(3, 1), sp["hudsonia"]: _images(2, 2), sp["corax"]: _images(2, 3)}
    real = {sp["pica"]: _images(4, 4), sp["hudsonia"]: _images(1, 5)}
    r = lp.lpips_fidelity(model, gen, real, k=2, seed=0, resolution=RES)
    pica, hud = r["per_species"][sp["pica"]], r["per_species"][sp["hudsonia"]]
    assert (pica["k"], pica["n_pairs"]) == (2, 6) and (hud["k"], hud["n_pairs"]) == (1, 2)
    assert [s["taxon"] for s in r["skipped"]] == [sp["corax"]] and r["n_species"] == 2
    # one real image: both generated images are paired with it
    want = lp.lpips_distance(model, gen[sp["hudsonia"]], real[sp["hudsonia"]].expand(2, -1, -1, -1),
                             resolution=RES).mean()
    assert hud["lpips"] == pytest.approx(float(want), abs=1e-6)
    assert r["mean_over_species"] == pytest.approx((pica["lpips"] + hud["lpips"]) / 2)
    assert r["mean_over_pairs"] == pytest.approx((pica["lpips"] * 6 + hud["lpips"] * 2) / 8)
    again = lp.lpips_fidelity(model, gen, real, k=2, seed=0, resolution=RES)
    assert again["per_species"][sp["pica"]]["lpips"] == pica["lpips"]
    assert r["provenance"]["settings"]["k_real_per_generated"] == 2
    assert r["provenance"]["resolution"] == RES and r["provenance"]["library"] == "lpips"
    # a generated image identical to the only real image has fidelity LPIPS 0
    one = lp.lpips_fidelity(model, {sp["pica"]: real[sp["hudsonia"]]}, {sp["pica"]: real[sp["hudsonia"]]},
                            resolution=RES)
    assert abs(one["per_species"][sp["pica"]]["lpips"]) < 1e-6


def test_diversity_pairs(model):
    sp = {t.name: t for t in TAX.species}
    x = _images(4, 7)
    gen = {sp["pica"]: x, sp["hudsonia"]: x[:1], sp["corax"]: x[:1].repeat(3, 1, 1, 1)}
    r = lp.lpips_diversity(model, gen, resolution=RES)
    assert r["per_species"][sp["pica"]]["n_pairs"] == 6 and r["per_species"][sp["pica"]]["lpips"] > 1e-3
    assert abs(r["per_species"][sp["corax"]]["lpips"]) < 1e-6  # three identical images: no diversity
    assert [s["taxon"] for s in r["skipped"]] == [sp["hudsonia"]]
    capped = lp.lpips_diversity(model, {sp["pica"]: x}, max_pairs=3, resolution=RES)
    assert capped["per_species"][sp["pica"]]["n_pairs"] == 3
