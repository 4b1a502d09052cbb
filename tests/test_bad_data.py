"""Hostile input (issue 23): every kind of bad data is a located error or a counted skip, never a
traceback and never a silent wrong result. One test per category; each failed before the fix."""
import json
import struct
import unicodedata
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from taxadiffusion.datasets import DataError, read_table
from taxadiffusion.datasets.prepare import prepare
from taxadiffusion.taxonomy import Taxonomy

from test_readers import names_error as located  # one check that an error names file, row, field

HEADER = "file_name,family,genus,species\n"


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def images(root: Path, *names: str) -> None:
    """Tiny real JPEGs at root/name."""
    for i, n in enumerate(names):
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (10 * i, 80, 160)).save(p)


def warned(report, *parts) -> str:
    hits = [w for w in report.warnings if all(p in w for p in parts)]
    assert hits, report.warnings
    return hits[0]


# -- 1. missing image files: counted and listed by default, an error under strict --------------
def test_missing_image_file_is_counted_listed_and_strict_refuses(tmp_path, capsys):
    images(tmp_path, "a.jpg", "b.jpg")
    f = write(tmp_path / "m.csv", HEADER + "a.jpg,F,G,x\nb.jpg,F,G,y\ngone.jpg,F,G,z\n")
    t = read_table("csv", f, tmp_path)
    assert len(t.records) == 2 and t.report.dropped == {"image file missing": 1}
    warned(t.report, str(f), "row 4", "'file_name'", "gone.jpg")
    with pytest.raises(DataError, match="gone.jpg") as e:
        read_table("csv", f, tmp_path, strict=True)
    located(e.value, f, 4, "file_name")
    prepare("csv", f, images=tmp_path, out=tmp_path / "out")
    out = capsys.readouterr().out
    assert "rows read 3, used 2, dropped 1" in out and "image file missing 1" in out
    # every file missing: the error says which folder was searched and what to check
    with pytest.raises(DataError, match="none of the 3 image files exist.*--images"):
        read_table("csv", f, tmp_path / "elsewhere")
    assert len(read_table("csv", f, tmp_path / "elsewhere", check_files=False).records) == 3


# -- 2. ragged rows, duplicated columns, names that collide after normalisation ----------------
def test_ragged_rows_are_skipped_and_counted_never_read_as_missing_ranks(tmp_path):
    images(tmp_path, "a.jpg", "b.jpg", "c.jpg", "d.jpg")
    f = write(tmp_path / "m.csv", HEADER + "a.jpg,F,G,x\nb.jpg,F\nc.jpg,F,G,y,extra\nd.jpg,F,G,z,,\n")
    t = read_table("csv", f, tmp_path, missing="keep")
    assert [r.image_id for r in t.records] == ["a.jpg", "d.jpg"]  # empty trailing cells are harmless
    assert t.report.dropped == {"ragged row": 2} and not t.report.truncated
    warned(t.report, str(f), "row 3", "2 cells", "4 columns")
    warned(t.report, str(f), "row 4", "5 cells")
    with pytest.raises(DataError, match="2 cells but the header has 4 columns") as e:
        read_table("csv", f, tmp_path, strict=True)
    located(e.value, f, 3, None)


@pytest.mark.parametrize("header", ["file_name,family,genus,Genus,species",
                                    "file_name,family,genus,genus,species"])
def test_duplicated_column_is_reported(tmp_path, header):
    images(tmp_path, "a.jpg")
    f = write(tmp_path / "m.csv", header + "\na.jpg,F,Gfirst,Gsecond,x\n")
    t = read_table("csv", f, tmp_path)
    assert t.records[0].lineage == ("F", "Gfirst", "x")  # the first column, whichever spelling
    warned(t.report, str(f), "row 1", "columns 3", "and 4", "the first")
    with pytest.raises(DataError, match="same field") as e:
        read_table("csv", f, tmp_path, strict=True)
    located(e.value, f, 1, header.split(",")[3])


def test_names_colliding_after_case_or_unicode_normalisation(tmp_path):
    nfc = unicodedata.normalize("NFC", "Pass\u00e9r")
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfc != nfd
    images(tmp_path, *(f"{c}.jpg" for c in "abcde"))
    f = write(tmp_path / "m.csv", HEADER + f"a.jpg,F,Empidonax,x\nb.jpg,F,empidonax,x\nc.jpg,F,{nfc},y\n"
              f"d.jpg,F,{nfd},y\ne.jpg,F,\uff25mpidonax,x\n")  # full-width E: equal under NFKC only
    t = read_table("csv", f, tmp_path)
    assert len(t.records) == 5 and t.taxonomy().summary()["genus"] == 5  # kept, but not silently
    warned(t.report, str(f), "row 3", "'genus'", "'Empidonax'", "row 2")
    warned(t.report, str(f), "row 5", "'genus'", "Unicode")
    warned(t.report, str(f), "row 6", "'genus'")
    with pytest.raises(DataError, match="differ only in") as e:
        read_table("csv", f, tmp_path, strict=True)
    located(e.value, f, 3, "genus")


# -- 3. the lineage separator inside a name ------------------------------------------------------
def test_name_with_lineage_separator_is_refused(tmp_path):
    images(tmp_path, "a.jpg", "b.jpg")
    f = write(tmp_path / "m.csv", HEADER + "a.jpg,F,G,x\nb.jpg,F,Aves > Corvidae,y\n")
    with pytest.raises(DataError, match="' > '") as e:
        read_table("csv", f, tmp_path)
    located(e.value, f, 3, "genus")
    with pytest.raises(ValueError, match="' > '"):
        Taxonomy(["genus", "species"], [("A > B", "c")])


# -- 4. 16-bit images ----------------------------------------------------------------------------
def _png16_rgb(path: Path, rgb16: tuple[int, int, int], size=(4, 3)) -> None:
    """A 16-bit-per-channel RGB PNG, written by hand (PIL cannot write one)."""
    w, h = size
    raw = b"".join(b"\x00" + struct.pack(">HHH", *rgb16) * w for _ in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    from taxadiffusion.datasets.images import load_image
    grey = np.full((3, 5), 32768, np.uint16)  # mid grey in 16 bits
    Image.fromarray(grey).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode in ("I;16", "I")
    a = np.asarray(load_image(tmp_path / "g16.png"))
    assert a.dtype == np.uint8 and a.shape == (3, 5, 3) and np.all(np.abs(a.astype(int) - 128) <= 1)
    Image.fromarray(grey.astype(np.int32) // 2).save(tmp_path / "i32.tif")  # 16-bit data in mode "I"
    with Image.open(tmp_path / "i32.tif") as im:
        assert im.mode == "I"
    assert np.all(np.abs(np.asarray(load_image(tmp_path / "i32.tif")).astype(int) - 64) <= 1)
    _png16_rgb(tmp_path / "rgb16.png", (65535, 32768, 0))
    a = np.asarray(load_image(tmp_path / "rgb16.png")).astype(int)
    assert np.all(np.abs(a - [255, 128, 0]) <= 1)


# -- 5. iNat 2021 JSON with wrong types ----------------------------------------------------------
CAT = {"id": 7, "kingdom": "Animalia", "phylum": "Chordata", "class": "Aves", "order": "Passeriformes",
       "family": "Tyrannidae", "genus": "Empidonax", "specific_epithet": "traillii"}


def inat(tmp_path, ims=None, anns=None, cats=None, **extra) -> Path:
    data = {"images": ims if ims is not None else [{"id": 1, "file_name": "1.jpg"}],
            "categories": cats if cats is not None else [CAT],
            "annotations": anns if anns is not None else [{"id": 1, "image_id": 1, "category_id": 7}],
            **extra}
    return write(tmp_path / "train.json", json.dumps(data))


BAD_INAT = {  # name: (images, annotations, categories, extra, row, field, message)
    "image record a string": (["1.jpg"], None, None, {}, 1, "images", "not an object"),
    "annotations null": (None, None, None, {"annotations": None}, None, "annotations", "null"),
    "file_name a number": ([{"id": 1, "file_name": 17}], None, None, {}, 1, "file_name", "string"),
    "image id a string": ([{"id": "1", "file_name": "1.jpg"}], None, None, {}, 1, "id", "integer"),
    "category_id a float": (None, [{"image_id": 1, "category_id": 7.5}], None, {}, 1, "category_id",
                            "integer"),
    "genus a list": (None, None, [{**CAT, "genus": ["Empidonax"]}], {}, 1, "genus", "string"),
    "categories an object": (None, None, {"7": CAT}, {}, None, "categories", "list"),
    "annotation a list": (None, [[1, 7]], None, {}, 1, "annotations", "not an object"),
}


@pytest.mark.parametrize("case", sorted(BAD_INAT))
def test_inat_wrong_types_are_located_errors(tmp_path, case):
    ims, anns, cats, extra, row, field, msg = BAD_INAT[case]
    images(tmp_path, "1.jpg")
    f = inat(tmp_path, ims, anns, cats, **extra)
    with pytest.raises(DataError, match=msg) as e:
        read_table("inat2021", f, tmp_path)
    located(e.value, f, row, field)


def test_inat_duplicate_image_id_names_both_records(tmp_path):
    images(tmp_path, "1.jpg", "2.jpg", "3.jpg")
    f = inat(tmp_path, [{"id": 1, "file_name": "1.jpg"}, {"id": 3, "file_name": "3.jpg"},
                        {"id": 1, "file_name": "2.jpg"}],
             [{"image_id": 1, "category_id": 7}, {"image_id": 3, "category_id": 7}])
    with pytest.raises(DataError, match="image record 0") as e:
        read_table("inat2021", f, tmp_path, strict=True)
    located(e.value, f, 3, "id")
    t = read_table("inat2021", f, tmp_path)  # the ambiguous annotation is skipped, counted
    assert [r.image_id for r in t.records] == ["3"]
    assert t.report.dropped == {"image id with two image records": 1}
    warned(t.report, str(f), "row 1", "'image_id'", "1.jpg", "2.jpg")


def test_bioscan5m_json_non_string_cells(tmp_path):
    rec = {"processid": "P1", "split": "train", "chunk": 3, "class": "Insecta", "order": "Diptera",
           "family": "Phoridae", "genus": "Megaselia", "species": "Megaselia scalaris"}
    images(tmp_path, "train/3/P1.jpg")
    f = write(tmp_path / "r.json", json.dumps([rec]))
    assert read_table("bioscan5m", f, tmp_path).records[0].path.endswith("train/3/P1.jpg")
    for key, value in (("genus", ["Megaselia"]), ("processid", 12), ("family", {"name": "x"})):
        f = write(tmp_path / "r.json", json.dumps([rec, {**rec, "processid": "P2", key: value}]))
        with pytest.raises(DataError, match="string") as e:
            read_table("bioscan5m", f, tmp_path)
        located(e.value, f, 2, key)
    f = write(tmp_path / "r.json", json.dumps([{**rec, "Genus": "Other"}]))
    with pytest.raises(DataError, match="two keys") as e:
        read_table("bioscan5m", f, tmp_path)
    located(e.value, f, 1, "genus")


# -- 7. the training log names the unreadable file, not its replacement ---------------------------
def test_dataset_item_names_the_requested_record(tmp_path):
    from taxadiffusion.datasets.images import BadImageWarning, SpeciesImageDataset
    images(tmp_path, "a.jpg", "b.jpg", "c.jpg")
    t = read_table("csv", write(tmp_path / "m.csv", HEADER + "a.jpg,F,G,x\nb.jpg,F,G,y\nc.jpg,F,G,z\n"),
                   tmp_path)
    (tmp_path / "b.jpg").write_bytes(b"broken")
    ds = SpeciesImageDataset(t, t.taxonomy(), 8, train=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        item = ds[1]
    assert item["bad"] == 1 and item["index"] == 2 and item["requested"] == 1
    assert t.records[item["requested"]].path.endswith("b.jpg")  # what data_stream should log
    assert ds[0]["requested"] == 0 == ds[0]["index"]
