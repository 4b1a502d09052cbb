"""`prepare`: summary, the files it writes, the CLI, and every format excerpt end to end."""
import json

import numpy as np
import pytest
from PIL import Image

from taxadiffusion.cli import main
from taxadiffusion.datasets.prepare import prepare
from taxadiffusion.taxonomy import Taxonomy


def tiny_dataset(root, bad=()):
    """Two families, three species, one genus-only row; tiny JPEGs."""
    rows = [("F1", "G1", "a"), ("F1", "G1", "a"), ("F1", "G1", "b"), ("F2", "G2", "c"), ("F2", "G2", "")]
    lines = ["file_name,order,family,genus,specific_epithet"]
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    for i, (f, g, s) in enumerate(rows):
        p = root / "img" / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (20, 28, 3), np.uint8)).save(p)
        if i in bad:
            p.write_bytes(b"broken")
        lines.append(f"img/{i}.jpg,O1,{f},{g},{s}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")


def test_prepare_writes_everything(tmp_path, capsys):
    tiny_dataset(tmp_path / "data", bad=(1,))
    out = tmp_path / "out"
    table, tax = prepare("csv", None, images=tmp_path / "data", out=out, preview=True,
                         check_images=True, missing="drop")
    text = capsys.readouterr().out
    assert "rows read 5, used 3, dropped 2" in text
    assert "dropped: missing species 1, unreadable image 1" in text
    assert "taxa per rank: order 1, family 2, genus 2, species 3" in text
    assert "few-shot species (<= 5 images): 3" in text and "unreadable images: 1" in text
    assert Taxonomy.load(out / "taxonomy.json") == tax
    assert len((out / "table.csv").read_text().splitlines()) == 1 + len(table.records) == 4
    rep = json.loads((out / "report.json").read_text())
    assert rep["images"] == 3 and rep["taxa"]["species"] == 3 and rep["few_shot_species"] == 3
    assert rep["dropped"] == {"missing species": 1, "unreadable image": 1}
    assert rep["unreadable_images"][0]["path"].endswith("img/1.jpg")
    with Image.open(out / "preview.png") as im:  # one row per family, 6 tiles wide
        assert im.size == (250 + 6 * 100, 2 * 100 + 4)


def test_cli_prepare_and_error(tmp_path, capsys):
    tiny_dataset(tmp_path / "data")
    main(["prepare", "csv", str(tmp_path / "data" / "metadata.csv"), "--images", str(tmp_path / "data"),
          "--out", str(tmp_path / "o"), "--missing-ranks", "fill", "--ranks", "family,genus,species"])
    text = capsys.readouterr().out
    assert "taxa per rank: family 2, genus 2, species 4" in text and "filled 'None': species 1" in text
    assert json.loads((tmp_path / "o" / "report.json").read_text())["upper_ranks"] == ["order"]
    (tmp_path / "bad.csv").write_text("path,genus\nx.jpg,A\n")
    with pytest.raises(SystemExit) as e:
        main(["prepare", "csv", str(tmp_path / "bad.csv"), "--images", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "bad.csv, row 1, field 'file_name'" in err


def test_prepare_cub(cub_dir, tmp_path, capsys):
    # the default policy, "fill" (the released code's): the 11 rows of CUB's 4 genus-only classes
    # become "species: None" under their genus, so all 195 classes are species
    table, tax = prepare("csv", cub_dir / "metadata.csv", images=cub_dir, out=tmp_path / "a")
    assert len(table.records) == 832
    assert tax.summary() == {"kingdom": 1, "phylum": 1, "class": 1, "order": 13, "family": 37,
                             "genus": 119, "species": 195}
    assert "filled 'None': species 11" in capsys.readouterr().out
    _, tax = prepare("csv", cub_dir / "metadata.csv", images=cub_dir, out=tmp_path / "b",
                     missing="drop")
    assert tax.summary() == {"kingdom": 1, "phylum": 1, "class": 1, "order": 13, "family": 36,
                             "genus": 115, "species": 191}
    assert "dropped: missing species 11" in capsys.readouterr().out
    table, tax = prepare("csv", cub_dir / "metadata.csv", images=cub_dir, out=tmp_path / "c",
                         ranks=["class", "order", "family", "genus", "species"])
    assert len(table.records) == 832
    assert tax.summary() == {"class": 1, "order": 13, "family": 37, "genus": 119, "species": 195}
    assert tax.upper == {"Aves": ("Animalia", "Chordata")}


CASES = [  # format, file, options, expected summary fragments
    ("inat2021", "inat2021_excerpt.json", {},
     ["rows read 2, used 2, dropped 0", "fixed: lineage from the folder name (category not listed) 2"]),
    ("fishnet", "fishnet_test_csv_excerpt.csv", {"missing": "drop"},
     ["rows read 13, used 8, dropped 5", "dropped: missing species 5",
      "fixed: class Actinopteri -> Actinopterygii 8", "no box file (whole image used) 8"]),
    ("fishnet", "fishnet_test_csv_excerpt.csv", {"missing": "keep"},
     ["rows read 13, used 13, dropped 0", "kept above a missing rank: species 5"]),
    ("bioscan1m", "bioscan1m_small_validation_metadata_excerpt.tsv", {"missing": "drop"},
     ["rows read 8, used 1, dropped 7", "dropped: missing genus 6, missing species 1",
      "fixed: part folder from image_tar 8"]),
    ("bioscan1m", "bioscan1m_small_validation_metadata_excerpt.tsv", {"missing": "keep"},
     ["rows read 8, used 8, dropped 0", "taxa per rank: class 1, order 1, family 5, genus 2, species 1"]),
    ("bioscan5m", "bioscan5m_sample_metadata_excerpt.json", {"missing": "fill"},
     ["rows read 2, used 2, dropped 0", "filled 'None': species 1"]),
]


@pytest.mark.parametrize("fmt,name,opts,expect", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_prepare_every_format_excerpt(formats_dir, tmp_path, capsys, fmt, name, opts, expect):
    # no images exist for the excerpts: without the file check, the preview shows "unreadable"
    # tiles instead of failing
    prepare(fmt, formats_dir / name, images=tmp_path, out=tmp_path / "out", preview=True,
            check_files=False, **opts)
    text = capsys.readouterr().out
    for e in expect:
        assert e in text, text
    assert (tmp_path / "out" / "preview.png").exists()
