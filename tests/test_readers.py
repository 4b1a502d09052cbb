"""Metadata readers: every file in ../shared/formats parses, awkward rows follow the policy and are
counted, and every kind of bad input is an error naming the file, the row and the field."""
import json
import re
from pathlib import Path

import pytest

from taxadiffusion.datasets import READERS, DataError, read_order_table
from taxadiffusion.datasets import read_table as _read_table
from taxadiffusion.datasets.fishnet import read_fishnet
from taxadiffusion.datasets.inat import parse_folder_name


def read_table(*args, **kw):
    """These tests are about metadata, and the images are not there: the file check is off
    (tests/test_bad_data.py covers missing image files)."""
    kw.setdefault("check_files", False)
    return _read_table(*args, **kw)

CUB_HEADER = "file_name,kingdom,phylum,class,order,family,genus,specific_epithet\n"
CUB_ROW = "images/a{i}.jpg,Animalia,Chordata,Aves,Procellariiformes,Diomedeidae,Phoebastria,nigripes\n"


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def names_error(e: DataError, path, row, field) -> None:
    msg = str(e)
    assert str(path) in msg, msg
    if row is not None:
        assert f"row {row}" in msg, msg
    if field is not None:
        assert repr(field) in msg, msg


def test_readers_registry_is_plain_dict():
    assert type(READERS) is dict
    assert set(READERS) == {"inat2021", "inat-folders", "fishnet", "bioscan1m", "bioscan5m", "csv"}
    with pytest.raises(ValueError, match="known formats: bioscan1m, bioscan5m, csv, fishnet"):
        read_table("coco", "x.json", ".")


# -- the real excerpts ---------------------------------------------------------------------------
def test_inat2021_excerpt_recovers_lineage_from_folder(formats_dir, tmp_path):
    t = read_table("inat2021", formats_dir / "inat2021_excerpt.json", tmp_path)
    assert len(t.records) == 2 and t.preprocess == "inat"
    assert t.report.fixed == {"lineage from the folder name (category not listed)": 2}
    lin = {r.image_id: r.lineage for r in t.records}
    assert lin["2686843"] == ("Animalia", "Chordata", "Aves", "Passeriformes", "Meliphagidae",
                              "Ptilotula", "penicillata")
    tax = t.taxonomy()
    assert tax.summary()["species"] == 2
    assert tax.lookup("Psaltriparus minimus").rank == "species"
    assert t.records[0].path.endswith("val/03938_Animalia_Chordata_Aves_Passeriformes_Meliphagidae_"
                                      "Ptilotula_penicillata/df8edd4c-fbb4-4886-8600-a429e5efac23.jpg")


def test_fishnet_excerpt_policies(formats_dir, tmp_path):
    f = formats_dir / "fishnet_test_csv_excerpt.csv"
    t = read_table("fishnet", f, tmp_path, missing="drop")
    r = t.report
    assert (r.rows_read, len(t.records), dict(r.dropped)) == (13, 8, {"missing species": 5})
    assert r.fixed["class Actinopteri -> Actinopterygii"] == 8
    assert str(formats_dir / "fishnet_train_full_meta_new.csv") in r.sources  # auto-detected
    rec = next(x for x in t.records if x.image_id == "17530")
    assert rec.lineage == ("Actinopterygii", "Gobiiformes", "Gobiidae", "Cristatogobius", "lophius")
    assert rec.path == str(tmp_path.resolve() / "Gobiidae" / "Crlop_m0.jpg")  # URL -> basename
    assert t.upper == {"Actinopterygii": ("Animalia", "Chordata")}
    assert t.taxonomy().summary() == {"class": 1, "order": 1, "family": 1, "genus": 7, "species": 8}
    keep = read_table("fishnet", f, tmp_path, missing="keep")
    assert len(keep.records) == 13 and keep.report.truncated == {"species": 5}
    assert {len(x.lineage) for x in keep.records} == {4, 5}
    fill = read_table("fishnet", f, tmp_path, missing="fill")
    assert fill.report.filled == {"species": 5}
    assert fill.taxonomy().summary()["class"] == 1  # one spelling of the class


def test_fishnet_order_table_is_recognised_and_usable(formats_dir, tmp_path):
    table = formats_dir / "fishnet_train_full_meta_new.csv"
    orders = read_order_table(table)
    assert len(orders) == 463 and orders["Gobiidae"] == "Gobiiformes"
    with pytest.raises(DataError, match="family-to-order table.*order_table") as e:
        read_table("fishnet", table, tmp_path)
    names_error(e.value, table, 1, "image")
    # usable explicitly, on a copy away from the auto-detected place, with a stale Order
    csv = (formats_dir / "fishnet_test_csv_excerpt.csv").read_text()
    csv = csv.replace(",Gobiidae,Gobiiformes,Actinopteri", ",Gobiidae,Perciformes/Gobioidei,Actinopteri")
    csv = csv.replace(",Gobiidae,3.22000002861023,benthic,1,0,0,0,0,0,1,0,Gobiiformes,",
                      ",Gobiidae,3.22000002861023,benthic,1,0,0,0,0,0,1,0,,")
    f = write(tmp_path / "anns" / "test.csv", csv)
    t = read_fishnet(f, tmp_path, order_table=table, missing="drop", check_files=False)
    assert {x.lineage[1] for x in t.records} == {"Gobiiformes"}
    assert t.report.fixed["order from the family-to-order table"] == 8
    t2 = read_fishnet(f, tmp_path, order_table=False, missing="drop",
                      check_files=False)  # NewOrder repairs all but the emptied one
    assert t2.report.fixed["order from NewOrder"] == 7
    assert t2.report.notes["order with '/' kept as written (no NewOrder or table entry)"] == 1


def test_bioscan1m_excerpt_part_from_image_tar(formats_dir, tmp_path):
    f = formats_dir / "bioscan1m_small_validation_metadata_excerpt.tsv"
    t = read_table("bioscan1m", f, tmp_path, missing="drop")
    assert t.report.fixed == {"part folder from image_tar": 8}
    assert dict(t.report.dropped) == {"missing genus": 6, "missing species": 1}
    (rec,) = t.records
    assert rec.lineage == ("Insecta", "Coleoptera", "Dytiscidae", "Hydroporus", "striola")
    assert rec.path == str(tmp_path.resolve() / "part15" / "5016789.jpg")
    assert rec.image_id == "GBIOA642-21" and t.preprocess == "bioscan"
    assert t.upper == {"Insecta": ("Animalia", "Arthropoda")}
    keep = read_table("bioscan1m", f, tmp_path, missing="keep")
    assert len(keep.records) == 8 and keep.report.truncated == {"genus": 6, "species": 1}
    assert keep.records[0].path.endswith("part18/4286925.jpg")


def test_bioscan5m_json_excerpt(formats_dir, tmp_path):
    f = formats_dir / "bioscan5m_sample_metadata_excerpt.json"
    t = read_table("bioscan5m", f, tmp_path, missing="fill")
    paths = sorted(r.path for r in t.records)
    assert paths == [str(tmp_path.resolve() / "pretrain" / "a9" / "GMMVA27218-22.jpg"),
                     str(tmp_path.resolve() / "test" / "CRATC20925-23.jpg")]
    assert t.report.filled == {"species": 1}
    assert t.taxonomy().lookup("Tylozygus geometricus").path[-1] == "geometricus"
    drop = read_table("bioscan5m", f, tmp_path, missing="drop")
    assert len(drop.records) == 1 and drop.report.dropped == {"missing species": 1}


def _columns(text: str, start: str, stop: str) -> list[str]:
    block = text[text.index(start): text.index(stop)]
    while re.search(r"\([^()]*\)", block):
        block = re.sub(r"\([^()]*\)", "", block)
    return [c.strip(" .") for c in block.replace("\n", " ").split(",") if c.strip(" .")]


def test_bioscan_official_column_lists_parse(formats_dir, tmp_path):
    text = (formats_dir / "bioscan1m_official_metadata_columns.txt").read_text()
    cols1 = _columns(text, "sampleid, processid", "Missing ranks")
    assert "chunk_number" in cols1 and "image_file" in cols1 and len(cols1) == 28
    row = {c: "" for c in cols1} | {"processid": "P1", "phylum": "Arthropoda", "class": "Insecta",
                                    "order": "Diptera", "family": "Phoridae", "genus": "Megaselia",
                                    "species": "not_classified", "image_file": "1.jpg", "chunk_number": "3"}
    f = write(tmp_path / "m.tsv", "\t".join(cols1) + "\n" + "\t".join(row[c] for c in cols1) + "\n")
    t = read_table("bioscan1m", f, tmp_path, missing="keep")
    assert t.records[0].path.endswith("part3/1.jpg") and t.report.truncated == {"species": 1}

    cols5 = _columns(text, "processid, sampleid, taxon", "Image path")
    assert cols5[-1] == "chunk" and "split" in cols5
    row = {c: "" for c in cols5} | {"processid": "P2", "class": "Insecta", "order": "Diptera",
                                    "family": "Phoridae", "genus": "Megaselia",
                                    "species": "Megaselia scalaris", "split": "train", "chunk": "a1"}
    f = write(tmp_path / "m5.csv", ",".join(cols5) + "\n" + ",".join(row[c] for c in cols5) + "\n")
    t = read_table("bioscan5m", f, tmp_path)
    assert t.records[0].path.endswith("train/a1/P2.jpg")
    assert t.records[0].lineage[-2:] == ("Megaselia", "scalaris")


def test_inat_schema_from_readme_parses(formats_dir, tmp_path):
    text = (formats_dir / "inat2021_schema_from_README.txt").read_text()
    keys = {k: re.findall(r'"(\w+)"', re.search(k + r"\{(.*?)\}", text, re.S).group(1))
            for k in ("image", "category", "annotation")}
    assert "specific_epithet" in keys["category"] and "file_name" in keys["image"]
    cat = {k: 1 for k in keys["category"]} | {
        "id": 7, "kingdom": "Animalia", "phylum": "Chordata", "class": "Aves", "order": "Piciformes",
        "family": "Picidae", "genus": "Picoides", "specific_epithet": "pubescens"}
    img = {k: 1 for k in keys["image"]} | {"id": 5, "file_name": "train/x/5.jpg"}
    ann = {"id": 1, "image_id": 5, "category_id": 7}
    assert set(ann) == set(keys["annotation"])
    f = write(tmp_path / "train.json", json.dumps({"images": [img], "categories": [cat],
                                                    "annotations": [ann]}))
    t = read_table("inat2021", f, tmp_path)
    assert t.records[0].lineage[-2:] == ("Picoides", "pubescens") and not t.report.fixed
    # the README's note: test.json has no annotations
    f2 = write(tmp_path / "test.json", json.dumps({"images": [img], "categories": [cat]}))
    with pytest.raises(DataError, match="cannot be used for training") as e:
        read_table("inat2021", f2, tmp_path)
    names_error(e.value, f2, None, "annotations")


# -- iNat specifics ------------------------------------------------------------------------------
def test_inat_unknown_category_without_folder_match(tmp_path):
    img = {"id": 1, "file_name": "val/00012_A_B_C_D_E_F_g/1.jpg"}
    f = write(tmp_path / "v.json", json.dumps({"images": [img], "categories": [],
                                               "annotations": [{"image_id": 1, "category_id": 99}]}))
    with pytest.raises(DataError, match="no usable rows.*unknown category id"):
        read_table("inat2021", f, tmp_path)  # dropped with a reason, then nothing left
    with pytest.raises(DataError) as e:
        read_table("inat2021", f, tmp_path, strict=True)
    names_error(e.value, f, 1, "category_id")


def test_inat_folders(tmp_path):
    for d, n in (("00001_Animalia_Chordata_Aves_Piciformes_Picidae_Picoides_pubescens", 2),
                 ("00002_Animalia_Chordata_Aves_Piciformes_Picidae_Picoides_villosus", 1)):
        for i in range(n):
            write(tmp_path / "train" / d / f"{i}.jpg", b"x")
    write(tmp_path / "train" / "00001_Animalia_Chordata_Aves_Piciformes_Picidae_Picoides_pubescens"
          / "notes.txt", "x")
    t = read_table("inat-folders", tmp_path / "train", tmp_path, ranks=["family", "genus", "species"])
    assert len(t.records) == 3 and t.ranks == ("family", "genus", "species")
    assert t.upper_ranks == ("kingdom", "phylum", "class", "order")
    assert t.upper == {"Picidae": ("Animalia", "Chordata", "Aves", "Piciformes")}
    assert t.report.notes["non-image entries in class folders (ignored)"] == 1
    assert parse_folder_name("03938_Animalia_Chordata_Aves_Passeriformes_Meliphagidae_Ptilotula_"
                             "penicillata")[0] == 3938
    bad = tmp_path / "train" / "birds_misc"
    bad.mkdir()
    with pytest.raises(DataError, match="birds_misc.*field 'folder name'"):
        read_table("inat-folders", tmp_path / "train", tmp_path)


# -- FishNet specifics -----------------------------------------------------------------------------
FISH_HEADER = ",image,Genus,Family,Order,Class,Folder,NewOrder,species\n"


def test_fishnet_boxes_largest_and_missing(tmp_path):
    f = write(tmp_path / "anns" / "train.csv", FISH_HEADER
              + "1,a.jpg,Chaetodon,Chaetodontidae,Perciformes,Actinopterygii,Chaetodontidae,,Chaetodon auriga\n"
              + "2,https://www.fishbase.se/images/species/Chaur_u0.jpg,Chaetodon,Chaetodontidae,"
                "Perciformes,Actinopteri,Chaetodontidae,,Chaetodon auriga\n"
              + "3,c.jpg,Chaetodon,Chaetodontidae,Perciformes,Actinopterygii,Chaetodontidae,,Chaetodon lunula\n")
    write(tmp_path / "Images" / "Chaetodontidae" / "a.txt",
          "Chaetodontidae 12 113 74 210 \nChaetodontidae 441 230 489 326 \n")
    write(tmp_path / "Chaetodontidae" / "Chaur_u0.txt", "Chaetodontidae 1 2 30 40\n")
    t = read_table("fishnet", f, tmp_path)
    boxes = {r.image_id: r.box for r in t.records}
    assert boxes == {"1": (12.0, 113.0, 74.0, 210.0), "2": (1.0, 2.0, 30.0, 40.0), "3": None}
    assert t.report.notes["several boxes (the largest is used)"] == 1
    assert t.report.notes["no box file (whole image used)"] == 1
    write(tmp_path / "Images" / "Chaetodontidae" / "c.txt", "Chaetodontidae 1 2 3x 4\n")
    with pytest.raises(DataError) as e:
        read_table("fishnet", f, tmp_path)
    names_error(e.value, tmp_path / "Images" / "Chaetodontidae" / "c.txt", 1, "x2")


def test_fishnet_folder_must_equal_family(tmp_path):
    f = write(tmp_path / "t.csv", FISH_HEADER
              + "1,a.jpg,Chaetodon,Chaetodontidae,Perciformes,Actinopterygii,Gobiidae,,Chaetodon auriga\n")
    with pytest.raises(DataError, match="differs from Family") as e:
        read_table("fishnet", f, tmp_path)
    names_error(e.value, f, 2, "Folder")


# -- bad input: every message names the file, the row and the field ---------------------------------
def test_missing_columns(tmp_path):
    f = write(tmp_path / "m.csv", "path,genus,species\nx.jpg,A,b\n")
    with pytest.raises(DataError) as e:
        read_table("csv", f, tmp_path)
    names_error(e.value, f, 1, "file_name")
    f = write(tmp_path / "r.csv", "file_name,colour\nx.jpg,red\n")
    with pytest.raises(DataError, match="no rank column"):
        read_table("csv", f, tmp_path)
    f = write(tmp_path / "fish.csv", ",image,Family,Order,Class,species\n1,a.jpg,F,O,C,\n")
    with pytest.raises(DataError) as e:
        read_table("fishnet", f, tmp_path)
    names_error(e.value, f, 1, "Genus")
    f = write(tmp_path / "b.tsv", "class\torder\tfamily\tgenus\tspecies\timage_file\nI\tD\tP\tM\t\t1.jpg\n")
    with pytest.raises(DataError, match="chunk_number") as e:
        read_table("bioscan1m", f, tmp_path)
    names_error(e.value, f, 1, "chunk_number")


def test_unreadable_and_undecodable_files(tmp_path):
    with pytest.raises(DataError, match="cannot read") as e:
        read_table("csv", tmp_path / "nope.csv", tmp_path)
    assert str(tmp_path / "nope.csv") in str(e.value)
    f = write(tmp_path / "latin1.csv", (CUB_HEADER + CUB_ROW.format(i=1)).encode()
              + b"images/b.jpg,Animalia,Chordata,Aves,Passeriformes,Fringillidae,Carduelis,caf\xe9\n")
    with pytest.raises(DataError, match="not valid UTF-8") as e:
        read_table("csv", f, tmp_path)
    names_error(e.value, f, 3, "specific_epithet")
    # far down a big file: the streaming decoder fails mid-way, the error still names the row
    rows = "".join(CUB_ROW.format(i=i) for i in range(3000))
    f = write(tmp_path / "big.csv", (CUB_HEADER + rows).encode()
              + b"images/z.jpg,Animalia,Chordata,Av\xe9s,Passeriformes,Fringillidae,Carduelis,x\n")
    with pytest.raises(DataError, match="not valid UTF-8") as e:
        read_table("csv", f, tmp_path)
    names_error(e.value, f, 3002, "class")
    f = write(tmp_path / "broken.json", '{"images": [1, 2,]}')
    with pytest.raises(DataError, match="not valid JSON") as e:
        read_table("inat2021", f, tmp_path)
    names_error(e.value, f, 1, None)


def test_name_under_two_parents(tmp_path):
    f = write(tmp_path / "m.csv", CUB_HEADER + CUB_ROW.format(i=1)
              + "images/b.jpg,Animalia,Chordata,Aves,Procellariiformes,Laridae,Phoebastria,alba\n")
    t = read_table("csv", f, tmp_path)
    (w,) = t.report.warnings
    assert str(f) in w and "row 3" in w and "'genus'" in w and "Diomedeidae" in w and "Laridae" in w
    assert t.taxonomy().summary()["genus"] == 2  # identity is the path: two genera
    with pytest.raises(DataError, match="placed under two different family") as e:
        read_table("csv", f, tmp_path, strict=True)
    names_error(e.value, f, 3, "genus")


def test_duplicate_image_ids(tmp_path):
    f = write(tmp_path / "m.csv", CUB_HEADER + CUB_ROW.format(i=1) + CUB_ROW.format(i=1))
    with pytest.raises(DataError, match="duplicate image id") as e:
        read_table("csv", f, tmp_path)
    names_error(e.value, f, 3, "image id")


@pytest.mark.parametrize("bad", ["../x.jpg", "images/../../x.jpg", "/etc/passwd"])
def test_path_escaping_the_root(tmp_path, bad):
    root = tmp_path / "root"
    root.mkdir()
    f = write(tmp_path / "m.csv", CUB_HEADER + CUB_ROW.format(i=1)
              + CUB_ROW.format(i=2).replace("images/a2.jpg", bad))
    with pytest.raises(DataError, match="escapes the image root") as e:
        read_table("csv", f, root)
    names_error(e.value, f, 3, "file_name")  # the column the path came from


def test_binomial_disagreeing_with_genus(tmp_path):
    f = write(tmp_path / "m.csv", "file_name,family,genus,species\n"
              "a.jpg,Diomedeidae,Phoebastria,Phoebastria nigripes\n"
              "b.jpg,Diomedeidae,Phoebastria,Thalassarche immutabilis\n"
              "c.jpg,Diomedeidae,Phoebastria,immutabilis\n")
    t = read_table("csv", f, tmp_path)
    assert [r.lineage for r in t.records] == [("Diomedeidae", "Phoebastria", "nigripes"),
                                              ("Diomedeidae", "Phoebastria", "immutabilis")]
    assert t.report.dropped == {"binomial disagrees with genus": 1} and t.report.rows_read == 3
    (w,) = t.report.warnings
    assert str(f) in w and "row 3" in w and "'species'" in w and "Thalassarche" in w
    with pytest.raises(DataError, match="does not start with the genus") as e:
        read_table("csv", f, tmp_path, strict=True)
    names_error(e.value, f, 3, "species")


def test_bioscan5m_record_without_id(tmp_path):
    f = write(tmp_path / "s.json", json.dumps([{"_note": "x", "id": "A1", "split": "train", "class": "Insecta"},
                                               {"split": "train", "class": "Insecta"}]))
    with pytest.raises(DataError, match="record 1 has no image id") as e:
        read_table("bioscan5m", f, tmp_path, missing="keep")
    names_error(e.value, f, 2, "processid")


def test_ranks_selection_and_missing_values(tmp_path):
    f = write(tmp_path / "metadata.csv", CUB_HEADER + CUB_ROW.format(i=1)
              + "images/b.jpg,Animalia,Chordata,Aves,Procellariiformes,Diomedeidae,not_classified,\n")
    t = read_table("csv", None, tmp_path, ranks=["class", "order", "family", "genus", "species"],
                   missing="keep")
    assert t.ranks == ("class", "order", "family", "genus", "species")
    assert t.upper_ranks == ("kingdom", "phylum") and t.upper == {"Aves": ("Animalia", "Chordata")}
    assert t.report.truncated == {"genus": 1}
    assert t.taxonomy().bioclip_text(t.taxonomy().lookup("Phoebastria nigripes")) == \
        "a photo of Animalia Chordata Aves Procellariiformes Diomedeidae Phoebastria nigripes."
    with pytest.raises(ValueError, match="needs genus"):
        read_table("csv", None, tmp_path, ranks=["family", "species"])
    with pytest.raises(ValueError, match="cannot model rank"):
        read_table("fishnet", tmp_path / "x.csv", tmp_path, ranks=["kingdom", "species"])


def test_symlinks_leaving_the_root_and_the_list_of_missing_files(tmp_path, monkeypatch):
    from PIL import Image

    from taxadiffusion.datasets import table as table_mod
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "img").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (4, 4)).save(outside / "o.jpg")
    Image.new("RGB", (4, 4)).save(root / "img" / "a.jpg")
    (root / "img" / "in.jpg").symlink_to(root / "img" / "a.jpg")   # inside: followed
    (root / "img" / "out.jpg").symlink_to(outside / "o.jpg")       # a file leaving the root
    (root / "away").symlink_to(outside, target_is_directory=True)  # a folder leaving the root
    f = write(tmp_path / "m.csv", CUB_HEADER + CUB_ROW.format(i=1).replace("images/a1", "img/in"))
    (rec,) = _read_table("csv", f, root).records
    assert rec.path == str(root.resolve() / "img" / "a.jpg")
    for bad in ("img/out.jpg", "away/o.jpg"):
        f = write(tmp_path / "m.csv", CUB_HEADER + CUB_ROW.format(i=1).replace("images/a1.jpg", bad))
        with pytest.raises(DataError, match="escapes the image root") as e:
            _read_table("csv", f, root)
        names_error(e.value, f, 2, "file_name")
    # a wrong image root: every missing file is counted, only the first few are listed
    monkeypatch.setattr(table_mod, "LIST_MISSING_FILES", 2)
    f = write(tmp_path / "m.csv", CUB_HEADER + CUB_ROW.format(i=0).replace("images/a0", "img/a")
              + "".join(CUB_ROW.format(i=i) for i in range(1, 6)))
    t = _read_table("csv", f, root)
    assert t.report.dropped == {"image file missing": 5} and len(t.report.warnings) == 3
    assert t.report.warnings[-1].startswith("... and 3 more missing image files")
