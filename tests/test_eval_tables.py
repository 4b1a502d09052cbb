"""Tables: few-shot buckets, per-level grouping, Table S2 layout, metrics.json / metrics.md provenance."""
from __future__ import annotations

import json
from importlib import metadata

import pytest

from taxadiffusion.evaluation import tables as tb
from taxadiffusion.evaluation.weights import provenance
from taxadiffusion.taxonomy import Taxonomy

RANKS = ("class", "order", "family", "genus", "species")
# species image counts: hudsonia 1, pica 3, corax 5, fakea 10 (genus Pica reused), bubo 30
ROWS = ([("Aves", "Passeriformes", "Corvidae", "Pica", "hudsonia")]
        + [("Aves", "Passeriformes", "Corvidae", "Pica", "pica")] * 3
        + [("Aves", "Passeriformes", "Corvidae", "Corvus", "corax")] * 5
        + [("Aves", "Piciformes", "Picidae", "Pica", "fakea")] * 10
        + [("Mammalia", "Strigiformes", "Strigidae", "Bubo", "bubo")] * 30)
TAX = Taxonomy(RANKS, ROWS)
SP = {t.name: t for t in TAX.species}


def test_bucket_boundaries():
    assert [tb.bucket_of(n) for n in (1, 2, 5, 6, 20, 21, 500)] == ["1", "2-5", "2-5", "6-20", "6-20",
                                                                     ">20", ">20"]
    with pytest.raises(ValueError, match="0 training images"):
        tb.bucket_of(0)


def test_by_bucket_means_counts_and_missing_values():
    vals = {SP["hudsonia"]: 10.0, SP["pica"]: 20.0, SP["corax"]: 40.0, SP["fakea"]: 7.0}
    got = tb.by_bucket(vals, TAX)
    assert list(got) == list(tb.BUCKETS)
    assert got == {"1": (10.0, 1), "2-5": (30.0, 2), "6-20": (7.0, 1), ">20": (None, 0)}
    with pytest.raises(ValueError, match="Corvus > corax"):
        tb.by_bucket({**vals, SP["corax"]: float("nan")}, TAX)
    stranger = Taxonomy(RANKS, [("Aves", "X", "Y", "Z", "w")]).species[0]
    with pytest.raises(KeyError, match="no training images"):
        tb.by_bucket({stranger: 1.0}, TAX)


def test_grouping_by_level_keeps_homonyms_apart():
    vals = {t: i for i, t in enumerate(TAX.species)}
    by_genus = tb.group_by_level(vals, TAX, "genus")
    picas = [g for g in by_genus if g.name == "Pica"]
    assert len(picas) == 2
    assert {len(by_genus[g]) for g in picas} == {1, 2}   # Corvidae's Pica: 2 species; Picidae's: 1
    by_class = tb.group_by_level(vals, TAX, 0)
    assert {g.name: len(m) for g, m in by_class.items()} == {"Aves": 4, "Mammalia": 1}
    assert tb.ancestor_at(TAX, SP["fakea"], "family").name == "Picidae"
    with pytest.raises(ValueError, match="no ancestor"):
        tb.ancestor_at(TAX, tb.ancestor_at(TAX, SP["pica"], "order"), "genus")


def _result(kind, per_species, field, **extra):
    prov = provenance(kind, "lpips" if "lpips" in kind else "open_clip_torch", {"net": {"file": "x.pth",
                      "sha256": "ab" * 32}}, {"seed": 0}, 224, f"definition of {kind}")
    return {"kind": kind, "per_species": {t: {field: v} for t, v in per_species.items()},
            "provenance": prov, "skipped": [], **extra}


def test_table_s2_layout():
    aves = TAX.lookup("Aves")
    fid = {"kind": "fid_by_level", "levels": {}, "skipped": [],
           "per_taxon": {aves: {"fid": 12.5, "n_gen": 40, "n_real": 19}},
           "provenance": provenance("fid_kid", "torch-fidelity", {"inception": {"sha256": "c" * 64}},
                                    {}, 299, "fid def")}
    lp = _result("lpips_diversity", {SP["hudsonia"]: 0.2, SP["pica"]: 0.4, SP["bubo"]: 0.6}, "lpips")
    bio = _result("bioclip", {SP["hudsonia"]: 30.0, SP["bubo"]: 50.0}, "score")
    n_gen = {SP["hudsonia"]: 10, SP["pica"]: 10, SP["corax"]: 10, SP["fakea"]: 10, SP["bubo"]: 15}
    t = tb.table_s2(TAX, "class", n_gen, fid=fid, lpips=lp, bioclip=bio)
    rows = {r["class"]: r for r in t["rows"]}
    assert rows["Aves"]["species"] == 4 and rows["Aves"]["images per species"] == 10
    assert rows["Aves"]["FID"] == 12.5 and rows["Mammalia"]["FID"] is None
    assert rows["Aves"]["LPIPS"] == pytest.approx(0.3) and rows["Aves"]["LPIPS species"] == 2
    assert rows["Aves"]["BioCLIP"] == 30.0 and rows["Mammalia"]["BioCLIP"] == 50.0
    assert set(t["provenance"]) == {"FID", "LPIPS", "BioCLIP"}


def test_write_metrics_json_md_and_provenance(tmp_path):
    bio = _result("bioclip", {SP["hudsonia"]: 30.0, SP["pica"]: float("nan"), SP["bubo"]: 50.0}, "score",
                  score_mean_over_species=40.0, n_species=3)
    with pytest.raises(ValueError, match="not finite"):
        tb.few_shot_table({"BioCLIP": (bio, "score")}, TAX)
    bio["per_species"][SP["pica"]]["score"] = 44.0
    few = tb.few_shot_table({"BioCLIP": (bio, "score")}, TAX)
    assert [r["BioCLIP"] for r in few["rows"]] == [30.0, 44.0, None, 50.0]
    bio["per_species"][SP["pica"]]["std"] = float("nan")
    js, md = tb.write_metrics(tmp_path, {"bioclip": bio, "few_shot": few})
    doc = json.loads(js.read_text())
    entry = doc["results"]["bioclip"]
    assert entry["per_species"]["Aves > Passeriformes > Corvidae > Pica > pica"]["std"] is None
    prov = entry["provenance"]
    assert prov["library"] == "open_clip_torch"
    assert prov["library_version"] == metadata.version("open_clip_torch")
    assert prov["weights"]["net"]["sha256"] == "ab" * 32 and prov["resolution"] == 224
    assert doc["results"]["few_shot"]["provenance"]["BioCLIP"]["definition"] == "definition of bioclip"
    text = md.read_text()
    assert "## How each number was obtained" in text and "definition of bioclip" in text
    assert "| bucket |" in text and "| 2-5 |" in text
    assert f"open_clip_torch {metadata.version('open_clip_torch')}" in text
    with pytest.raises(ValueError, match="provenance"):
        tb.write_metrics(tmp_path, {"x": {"kind": "bioclip", "per_species": {}}})
    with pytest.raises(ValueError, match="unknown kind"):
        tb.write_metrics(tmp_path, {"x": {"kind": "mystery"}})


def test_taxon_seed_depends_on_lineage_only():
    a = tb.taxon_seed(0, SP["pica"])
    assert a == tb.taxon_seed(0, SP["pica"].path) and a != tb.taxon_seed(1, SP["pica"])
    assert a != tb.taxon_seed(0, SP["fakea"])


def test_generate_saves_then_reuses_its_samples_bit_for_bit(tmp_path):
    """evaluate's sample cache: the first call samples and writes PNGs under sample_dir, the second
    reads them back (no sampling) as the same writable uint8 tensors."""
    import warnings
    from types import SimpleNamespace

    import torch

    from taxadiffusion.evaluation.run import generate, sample_dir
    calls = []

    def pipe(t, num_images, generator, **kw):   # one seeded generator per image (samples.generate)
        calls.append((t, len(generator)))
        return SimpleNamespace(images=torch.stack([torch.randint(0, 256, (3, 8, 8), generator=g,
                                                                 dtype=torch.uint8) for g in generator]))
    settings = {"seed": 0, "guidance": "taxa", "guidance_scale": 3.0, "guide_level": 0,
                "num_inference_steps": 2, "batch_size": 4}
    taxa = [SP["corax"], SP["bubo"]]
    first = generate(pipe, taxa, 3, tmp_path, settings)
    assert len(calls) == 2
    assert sorted(p.name for p in sample_dir(tmp_path, SP["corax"]).iterdir()) == [
        "0000.png", "0001.png", "0002.png"]
    assert sample_dir(tmp_path, SP["corax"]) == (tmp_path / "species" /
                                                "Aves__Passeriformes__Corvidae__Corvus__corax")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a read-only buffer would warn in torch.from_numpy
        again = generate(pipe, taxa, 3, tmp_path, settings)
    assert len(calls) == 2  # nothing sampled again
    assert (first.stats["generated"], again.stats["reused"], again.stats["generated"]) == (6, 6, 0)
    for t in taxa:
        assert again[t].dtype == torch.uint8 and torch.equal(again[t], first[t])
    again[SP["corax"]][0, 0, 0, 0] += 1  # writable memory
