"""Image preprocessing per format, the training Dataset's determinism, and bad-image handling."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from taxadiffusion.datasets import read_table
from taxadiffusion.datasets.images import (PREPROCESS, BadImageWarning, SpeciesImageDataset,
                                           check_images, load_image, to_tensor)

RED, BLUE, GREEN, BLACK = (255, 0, 0), (0, 0, 255), (0, 255, 0), (0, 0, 0)


def stripes(w: int, h: int, colours) -> Image.Image:
    """Vertical stripes of equal width, one per colour."""
    a = np.zeros((h, w, 3), np.uint8)
    n = len(colours)
    for i, c in enumerate(colours):
        a[:, i * w // n:(i + 1) * w // n] = c
    return Image.fromarray(a)


def colours_in(t: torch.Tensor) -> set:
    """Dominant colours of a [-1, 1] tensor, judged per column."""
    a = ((t.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(int)
    found = set()
    for c, name in ((RED, "r"), (BLUE, "b"), (GREEN, "g")):
        if (np.abs(a - np.array(c)).sum(-1) < 60).mean(0).max() > 0.9:
            found.add(name)
    return found


@pytest.mark.parametrize("mode", sorted(PREPROCESS))
@pytest.mark.parametrize("size", [(60, 40), (40, 70), (500, 300)])
def test_shape_and_range(mode, size):
    blocks = np.random.default_rng(0).integers(0, 256, (4, 4, 3), np.uint8)  # coarse: survives shrinking
    img = Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST)
    for rng in (None, np.random.default_rng(1)):
        out = PREPROCESS[mode](img, None, 32, rng)
        t = to_tensor(out)
        assert t.shape == (3, 32, 32) and t.dtype == torch.float32
        assert t.min() >= -1 and t.max() <= 1 and t.min() < -0.5 and t.max() > 0.5


def test_to_tensor_endpoints():
    t = to_tensor(Image.new("RGB", (4, 4), (0, 255, 0)))
    assert torch.equal(t[0], -torch.ones(4, 4)) and torch.equal(t[1], torch.ones(4, 4))


def test_bioscan_pads_with_white():
    out = to_tensor(PREPROCESS["bioscan"](Image.new("RGB", (40, 20), BLACK), None, 32, None))
    assert torch.allclose(out[:, :6, :], torch.ones(3, 6, 32), atol=0.02)     # top band white
    assert torch.allclose(out[:, -6:, :], torch.ones(3, 6, 32), atol=0.02)    # bottom band white
    assert torch.allclose(out[:, 12:20, :], -torch.ones(3, 8, 32), atol=0.02)  # the image, centred


def test_fishnet_crops_to_the_box():
    a = np.zeros((100, 200, 3), np.uint8)
    a[:] = BLUE
    a[20:60, 120:180] = RED
    img = Image.fromarray(a)
    box = (120.0, 20.0, 180.0, 60.0)
    for rng in (None, np.random.default_rng(3), np.random.default_rng(4)):
        out = to_tensor(PREPROCESS["fishnet"](img, box, 32, rng))
        assert colours_in(out) == {"r"}
    assert "b" in colours_in(to_tensor(PREPROCESS["fishnet"](img, None, 32, None)))
    # a box outside the image falls back to the whole image instead of an empty crop
    out = PREPROCESS["fishnet"](img, (300.0, 300.0, 400.0, 400.0), 32, None)
    assert out.size == (32, 32)


def test_fishnet_train_half_crop_half_squash():
    img = stripes(120, 40, [RED, GREEN, BLUE])
    squashed = 0
    for s in range(60):
        out = to_tensor(PREPROCESS["fishnet"](img, None, 30, np.random.default_rng(s)))
        squashed += colours_in(out) == {"r", "g", "b"}  # a square crop never holds all three
    assert 15 <= squashed <= 45
    assert colours_in(to_tensor(PREPROCESS["fishnet"](img, None, 30, None))) == {"g"}  # eval: centre


def test_inat_train_crops_along_the_long_side_eval_centre():
    img = stripes(120, 40, [RED, GREEN, BLUE])
    seen = set()
    for s in range(30):
        seen |= colours_in(to_tensor(PREPROCESS["inat"](img, None, 32, np.random.default_rng(s))))
    assert seen == {"r", "g", "b"}
    assert colours_in(to_tensor(PREPROCESS["inat"](img, None, 32, None))) == {"g"}
    assert colours_in(to_tensor(PREPROCESS["center"](img, None, 32, np.random.default_rng(0)))) == {"g"}


def test_resize_filters_area_down_lanczos_up():
    a = np.zeros((64, 64, 3), np.uint8)
    a[:, ::2] = 255  # one-pixel columns: area averaging gives flat grey
    t = to_tensor(PREPROCESS["center"](Image.fromarray(a), None, 32, None))
    assert t.abs().max() < 0.01
    up = to_tensor(PREPROCESS["center"](stripes(8, 8, [BLACK, (255, 255, 255)]), None, 64, None))
    assert up.min() < -0.99 and up.max() > 0.99  # an enlarged edge stays sharp at the ends


# -- the Dataset ---------------------------------------------------------------------------------
def make_table(tmp_path, n=4, missing_species=False):
    rng = np.random.default_rng(0)
    lines = ["file_name,family,genus,species"]
    for i in range(n):
        a = rng.integers(0, 256, (30 + 7 * i, 50, 3), np.uint8)
        Image.fromarray(a).save(tmp_path / f"{i}.jpg", quality=90)
        sp = "" if (missing_species and i == n - 1) else f"sp{i % 2}"
        lines.append(f"{i}.jpg,Fam,Gen{i % 2},{sp}")
    (tmp_path / "metadata.csv").write_text("\n".join(lines) + "\n")
    return read_table("csv", None, tmp_path, missing="keep")


def test_ids_per_level_with_minus_one_below_lineage(tmp_path):
    t = make_table(tmp_path, missing_species=True)
    tax = t.taxonomy()
    ds = SpeciesImageDataset(t, tax, 16, train=False)
    assert ds[0]["ids"].tolist() == tax.ids(tax.lookup("Gen0 sp0"))
    assert ds[3]["ids"].tolist() == [0, 1, -1]  # kept to genus level
    assert ds[3]["ids"].dtype == torch.long and ds[3]["bad"] == 0 and ds[3]["index"] == 3


def test_train_crops_reproducible_and_vary_by_epoch(tmp_path):
    t = make_table(tmp_path)
    tax = t.taxonomy()
    # the CSV's own "center" preprocessing has no randomness; iNat's random crop has
    a = SpeciesImageDataset(t, tax, 16, train=True, seed=5, preprocess="inat")
    b = SpeciesImageDataset(t, tax, 16, train=True, seed=5, preprocess="inat")
    for i in range(len(a)):
        assert torch.equal(a[i]["pixels"], b[i]["pixels"])
    per_epoch = []
    for e in range(4):
        a.set_epoch(e)
        per_epoch.append(a[2]["pixels"])
    b.set_epoch(2)
    assert torch.equal(per_epoch[2], b[2]["pixels"])  # (seed, epoch, index) alone decides
    assert any(not torch.equal(per_epoch[0], p) for p in per_epoch[1:])
    c = SpeciesImageDataset(t, tax, 16, train=True, seed=6, preprocess="inat")
    assert any(not torch.equal(a[i]["pixels"], c[i]["pixels"]) for i in range(len(a)))
    ev = SpeciesImageDataset(t, tax, 16, train=False, preprocess="inat")
    first = ev[2]["pixels"]
    ev.set_epoch(3)
    assert torch.equal(first, ev[2]["pixels"])  # evaluation is fixed


def test_corrupt_image_is_replaced_and_flagged(tmp_path):
    t = make_table(tmp_path)
    data = (tmp_path / "1.jpg").read_bytes()
    (tmp_path / "1.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG
    ds = SpeciesImageDataset(t, t.taxonomy(), 16, train=True)
    with pytest.warns(BadImageWarning, match="1.jpg"):
        item = ds[1]
    assert item["bad"] == 1 and item["index"] == 2
    assert torch.equal(item["pixels"], ds[2]["pixels"]) and torch.equal(item["ids"], ds[2]["ids"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per file: no second warning
        assert ds[1]["index"] == 2
    (tmp_path / "3.jpg").write_bytes(b"not a jpeg")  # the last one wraps around to record 0
    with pytest.warns(BadImageWarning, match="3.jpg"):
        assert ds[3]["index"] == 0 and ds[3]["bad"] == 1


def test_check_images_counts_and_drops(tmp_path):
    t = make_table(tmp_path)
    (tmp_path / "2.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "3.jpg").unlink()
    ok, bad = check_images(t, workers=2)
    assert [p for p, _ in bad] == [str(tmp_path.resolve() / "2.jpg"), str(tmp_path.resolve() / "3.jpg")]
    assert len(ok.records) == 2 and ok.report.dropped["unreadable image"] == 2
    assert t.report.dropped["unreadable image"] == 0 and len(t.records) == 4  # input untouched
    assert any("2.jpg" in w and "row 4" in w for w in ok.report.warnings)
    assert load_image(ok.records[0].path).mode == "RGB"
