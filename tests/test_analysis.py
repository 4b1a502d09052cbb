"""Analysis (issue 8): trait and sibling grids, per-level attention maps, embedding maps, and their
commands, on one tiny training run made once for this module."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from taxadiffusion.analysis import find_run_folder
from taxadiffusion.analysis.attention import (LevelRecorder, attention_maps, level_contexts, level_parts,
                                              level_sum, recompose, recording)
from taxadiffusion.analysis.embeddings import embedding_map, perplexity_for, pool_tokens
from taxadiffusion.analysis.traits import (column_guide_level, emergence_reference, emergence_table,
                                          mean_pairwise_rms, pixel_change_text, pixel_changes,
                                          sibling_grid, siblings, trait_emergence, trait_grid)
from taxadiffusion.cli import main
from taxadiffusion.sampling import load_for_sampling

from tinyrun import tiny_overrides, write_images

# one worker runs this whole module, so the training run below is made once
pytestmark = [pytest.mark.xdist_group("analysis"), pytest.mark.usefixtures("one_thread")]

KW = dict(guidance="taxa", guidance_scale=3.0, num_inference_steps=6)
LINEAGE = ["class: Aves", "family: Corvidae", "genus: Corvus", "species: Corvus corax"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """All four stages, a few steps each; a larger lr for the later levels so that each level
    visibly changes the samples."""
    tmp = tmp_path_factory.mktemp("analysis")
    data = write_images(tmp / "data")
    env = {**os.environ, "TAXADIFFUSION_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    over = tiny_overrides(data, tmp / "runs", "a") + ["train.steps_per_stage=6", "train.lr=0.003",
                                                      "train.checkpoint_every=100"]
    subprocess.run([sys.executable, "-m", "taxadiffusion.cli", "train", "--config", "tiny-cpu", *over],
                   check=True, env=env, capture_output=True)
    return tmp / "runs" / "a"


@pytest.fixture(scope="module")
def pipe(run):
    p, _ = load_for_sampling(run, None, "cpu")
    return p


@pytest.fixture(scope="module")
def att(pipe):
    return attention_maps(pipe, "Corvus corax", 2, 3, **KW)


def test_trait_grid_levels_by_seeds(pipe):
    images, labels = trait_grid(pipe, "Corvus corax", 3, 5, **KW)
    assert images.shape == (4, 3, 3, 16, 16) and images.dtype == torch.uint8
    assert labels == LINEAGE
    for k in range(1, 4):  # each level changes the samples
        assert not torch.equal(images[k], images[k - 1]), k
    # a frozen seed gives the same grid again, bit for bit; another seed does not
    assert torch.equal(trait_grid(pipe, "Corvus corax", 3, 5, **KW)[0], images)
    other, _ = trait_grid(pipe, "Corvus corax", 3, 6, **KW)
    assert (other.int() - images.int()).abs().float().mean() > 10
    # row i does not depend on how many rows there are (up to float rounding in a smaller batch)
    fewer, _ = trait_grid(pipe, "Corvus corax", 2, 5, **KW)
    assert (fewer.int() - images[:, :2].int()).abs().max() <= 1
    # below the species: a genus grid has the genus's first three columns
    genus, glabels = trait_grid(pipe, "Corvus", 3, 5, **KW)
    assert glabels == LINEAGE[:3] and torch.equal(genus, images[:3])


def test_a_guide_level_holds_below_it_and_columns_above_guide_against_their_parent(run, pipe, tmp_path):
    """`--guide-level 2` (the genus of class > family > genus > species): the class and family columns
    cannot guide against the genus, so they guide against their parent (the same images as with
    guide level 0 for the family column), the genus column against the family, the species column and
    its siblings against the genus (other images than guide level 0)."""
    assert [column_guide_level(2, lvl) for lvl in range(4)] == [0, 0, 1, 2]
    assert [column_guide_level(0, lvl) for lvl in range(4)] == [0, 0, 0, 0]
    with pytest.raises(ValueError, match=">= 0"):
        column_guide_level(-1, 2)
    kw = {**KW, "guidance_scale": 30.0, "num_inference_steps": 3}  # a large scale: references differ visibly
    g0, _ = trait_grid(pipe, "Corvus corax", 2, 5, **kw, guide_level=0)
    g2, _ = trait_grid(pipe, "Corvus corax", 2, 5, **kw, guide_level=2)
    assert torch.equal(g2[:2], g0[:2])
    assert (g2[2:].int() - g0[2:].int()).abs().float().mean() > 0.5
    s0 = sibling_grid(pipe, "Corvus corax", 2, 5, **kw, guide_level=0)[0]
    assert not torch.equal(sibling_grid(pipe, "Corvus corax", 2, 5, **kw, guide_level=2)[0], s0)
    assert torch.equal(sibling_grid(pipe, "Corvus corax", 2, 5, **kw, guide_level=3)[0],
                       sibling_grid(pipe, "Corvus corax", 2, 5, **kw, guide_level=2)[0])
    main(["traits", str(run), "--taxon", "Corvus corax", "--n", "1", "--steps", "2",
          "--guide-level", "2", "--out", str(tmp_path)])
    settings = json.loads((tmp_path / "traits" / "Corvus_corax" / "settings.json").read_text())
    assert settings["guide_level"] == 2
    assert settings["reference_levels"] == {"levels": [None, 0, 1, 2], "siblings": 2}


def test_trait_emergence_counts_hits_per_column_and_rank():
    def predict(x):  # a judge that reads its answer from the first pixels: rank r's id at x[:, 0, 0, r]
        return x[:, 0, 0, :2].long()
    a = torch.zeros(2, 2, 3, 4, 4, dtype=torch.uint8)  # taxon A, truth (0, 1): 2 columns x 2 seeds
    a[0, 1, 0, 0, 1] = 1                               # column 0: seed 1 right at rank 1, seed 0 wrong
    a[1, :, 0, 0, 1] = 1                               # column 1: both right
    b = torch.ones(2, 2, 3, 4, 4, dtype=torch.uint8)   # taxon B, truth (1, 2): rank 0 right, rank 1 never
    m = trait_emergence(predict, [a, b], torch.tensor([[0, 1], [1, 2]]))
    torch.testing.assert_close(m, torch.tensor([[1.0, 0.25], [1.0, 0.5]]))
    with pytest.raises(ValueError, match="true lineages"):
        trait_emergence(predict, [a], torch.tensor([[0, 1], [1, 2]]))
    with pytest.raises(ValueError, match="columns"):
        trait_emergence(predict, [a, b[:1]], torch.tensor([[0, 1], [1, 2]]))


def test_emergence_reference_is_one_down_to_the_condition_then_a_uniform_guess(pipe):
    ref = emergence_reference(pipe.taxonomy, [("Aves", "Corvidae", "Corvus", "corax")])
    # below Aves: 2 families, 3 genera, 4 species; below Corvidae: 2 genera, 3 species; Corvus: 2 species
    expect = torch.tensor([[1, 1 / 2, 1 / 3, 1 / 4], [1, 1, 1 / 2, 1 / 3], [1, 1, 1, 1 / 2], [1, 1, 1, 1]])
    torch.testing.assert_close(ref, expect)
    both = emergence_reference(pipe.taxonomy, [("Aves", "Corvidae", "Corvus", "corax"),
                                               ("Aves", "Paridae", "Parus", "major")])
    assert both[2, 3] == pytest.approx((1 / 2 + 1) / 2)
    t = emergence_table(ref, ref, ["class", "family", "genus", "species"])
    assert t["rows"][0] == ["class", "1.00 (1.00)", "0.50 (0.50)", "0.33 (0.33)", "0.25 (0.25)"]


def test_pixel_changes_measure_columns_siblings_and_seeds():
    # 3 columns x 2 seeds of 1 x 2 x 2 images: column 1 adds 10 everywhere, column 2 adds nothing;
    # seed 1 is 30 above seed 0 in every column
    g = torch.zeros(3, 2, 1, 2, 2, dtype=torch.uint8)
    g[1:] += 10
    g[:, 1] += 30
    sibs = torch.stack([g[2], g[2], g[2] + 4])  # three siblings: two identical, one 4 above
    c = pixel_changes(g, sibs)
    assert c["column"] == pytest.approx([10.0, 0.0])
    assert c["siblings"] == pytest.approx((0 + 4 + 4) / 3)  # pairs (0,1), (0,2), (1,2)
    assert c["seeds"] == pytest.approx(30.0)
    one = pixel_changes(g[:, :1], sibs[:1])  # one seed, one sibling: nothing to compare
    assert one["siblings"] is None and one["seeds"] is None and one["column"] == pytest.approx([10.0, 0.0])
    # RMS, not mean absolute difference: a single pixel off by 8 of 4 is sqrt(64 / 4) = 4
    x = torch.zeros(2, 1, 1, 2, 2, dtype=torch.uint8)
    x[1, 0, 0, 0, 0] = 8
    assert mean_pairwise_rms(x) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_rms(x[:1])
    assert pixel_change_text(c, ["class", "genus", "species"]).startswith(
        "genus +10.0, species +0.0; siblings 2.7 apart at the same noise; two seeds of the taxon 30.0")


def test_sibling_grid_columns_are_the_species_of_the_genus(pipe):
    images, labels, total = sibling_grid(pipe, "Corvus frugilegus", 3, 5, **KW)
    assert labels == ["C. corax", "C. frugilegus"] and total == 2  # short: they fit a grid cell
    assert images.shape == (2, 3, 3, 16, 16)
    assert not torch.equal(images[0], images[1])
    levels, _ = trait_grid(pipe, "Corvus corax", 3, 5, **KW)
    assert torch.equal(images[0], levels[3])  # the same seeds as the trait grid
    capped, clabels, ctotal = sibling_grid(pipe, "Corvus frugilegus", 1, 5, max_siblings=1, **KW)
    assert clabels == ["C. frugilegus"] and ctotal == 2 and capped.shape[0] == 1
    assert [p[-1] for p in siblings(pipe, "Corvus")] == ["Corvus", "Pica"]
    assert [p[-1] for p in siblings(pipe, "Aves")] == ["Aves"]
    with pytest.raises(ValueError):
        sibling_grid(pipe, "Corvus corax", 1, max_siblings=0)


def test_recording_leaves_the_image_bit_identical(pipe, att):
    plain = pipe("Corvus corax", num_images=2, seed=3, output_type="uint8", progress=False, **KW).images
    assert torch.equal(plain, att.images)
    assert att.max_sum_error < 1e-5  # every recorded layer output is the sum of its level parts
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"AttnProcessor2_0"}


def test_level_parts_sum_to_the_attention_output(pipe):
    names = pipe.resolve_taxon("Corvus corax")
    ctx_l = level_contexts(pipe, names)
    torch.testing.assert_close(level_sum(ctx_l), pipe.context(names))
    attn = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn2"))
    torch.manual_seed(0)
    hs = torch.randn(2, 16, attn.to_q.in_features)
    ctx = level_sum(ctx_l)[None].expand(2, -1, -1)
    with torch.no_grad():
        parts, v0 = level_parts(attn, hs, ctx, ctx_l)
        # A V as AttnProcessor2_0 computes it (before the output projection)
        B, h = 2, attn.heads
        q, k, v = (x.view(B, -1, h, x.shape[-1] // h).transpose(1, 2)
                   for x in (attn.to_q(hs), attn.to_k(ctx), attn.to_v(ctx)))
        full = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 16, -1)
        torch.testing.assert_close(parts.sum(0) + v0, full)
        torch.testing.assert_close(recompose(attn, parts, v0, hs), AttnProcessor2_0()(attn, hs, ctx))
    assert parts.shape[0] == 4 and all(parts[l].abs().max() > 0 for l in range(4))


def test_maps_size_sign_and_normalisation(pipe, att):
    n_attn2 = sum(k.endswith("attn2.processor") for k in pipe.unet.attn_processors)
    assert att.maps.shape == (2, 4, 16, 16) and att.labels == LINEAGE
    assert att.calls == n_attn2 * KW["num_inference_steps"]
    assert (att.maps >= 0).all()
    torch.testing.assert_close(att.maps.sum(1).mean((-1, -2)), torch.ones(2))  # documented
    torch.testing.assert_close(att.shares().sum(1), torch.ones(2))
    shown = att.display()
    assert shown.min() >= 0 and torch.allclose(shown.amax((-1, -2)), torch.ones(2, 4))
    # a window of the trajectory averages fewer steps and gives other maps; no guidance: batch n
    late = attention_maps(pipe, "Corvus corax", 2, 3, window=(0.5, 1.0), **KW)
    assert late.calls == n_attn2 * 3 and not torch.allclose(late.maps, att.maps)
    bare = attention_maps(pipe, "Corvus corax", 2, 3, **{**KW, "guidance": "none"})
    assert bare.calls == att.calls and bare.max_sum_error < 1e-5


def test_recorder_refuses_another_taxons_context(pipe):
    other = level_contexts(pipe, pipe.resolve_taxon("Pica pica"))
    rec = LevelRecorder(other, 1, (16, 16), 2)
    with pytest.raises(RuntimeError, match="not the sum"), recording(pipe.unet, rec):
        pipe("Corvus corax", num_images=1, num_inference_steps=2, progress=False, batch_size=1)
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"AttnProcessor2_0"}


def test_perplexity_and_pooling():
    assert perplexity_for(4) == 1.0 and perplexity_for(31) == 10.0 and perplexity_for(1000) == 30.0
    assert perplexity_for(2) < 2 and perplexity_for(10, 3.5) == 3.5
    for bad in ((1, None), (10, 10.0), (10, 0.0)):
        with pytest.raises(ValueError):
            perplexity_for(*bad)
    seq = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    torch.testing.assert_close(pool_tokens(seq, mask), torch.stack([seq[0, 1:3].mean(0), seq[1, 1:4].mean(0)]))


def test_embedding_map_scores_and_errors(pipe):
    m = embedding_map(pipe, "species", "genus")
    assert m.perplexity == 1.0 and len(m.taxa) == 4 and m.groups.count("Aves > Corvidae > Corvus") == 2
    assert set(m.silhouette) == {"level_encoder", "text_encoder"}
    assert all(-1 <= s <= 1 and np.isfinite(s) for s in m.silhouette.values())
    assert m.silhouette["level_encoder"] != m.silhouette["text_encoder"]
    assert all(xy.shape == (4, 2) and np.isfinite(xy).all() for xy in m.xy.values())
    assert embedding_map(pipe, "species").color_rank == "genus"  # default: the parent rank
    with pytest.raises(ValueError, match="above"):
        embedding_map(pipe, "genus", "species")
    with pytest.raises(ValueError, match="groups"):  # 2 families, 1 class: nothing to separate
        embedding_map(pipe, "family", "class")


def _titles(run):
    return (run / "report.html").read_text()


def test_commands_end_to_end(run, pipe, tmp_path, monkeypatch):
    base = ["--n", "2", "--steps", "3"]
    main(["traits", str(run), "--taxon", "Corvus corax", *base])
    d = run / "analysis" / "traits" / "Corvus_corax"
    assert (d / "levels-seed0.png").is_file() and (d / "siblings-seed0.png").is_file()
    changes = json.loads((d / "settings.json").read_text())["pixel_changes"]
    assert len(changes["column"]) == 3 and all(v > 0 for v in changes["column"]) and changes["siblings"] > 0
    assert len(list((d / "images").glob("*.png"))) == 8
    assert "Trait discovery: species: Corvus corax" in _titles(run)

    ckpt = run / "checkpoints" / "stage-3-species" / "final"  # a checkpoint folder finds its run
    assert find_run_folder(ckpt) == run.resolve()
    main(["attention", str(ckpt), "--taxon", "Corvus corax", *base])
    d = run / "analysis" / "attention" / "Corvus_corax"
    summary = json.loads((d / "attention-seed0.json").read_text())
    assert len(summary["share_mean"]) == 4 and abs(sum(summary["share_mean"]) - 1) < 1e-5
    assert (d / "attention-seed0.png").is_file() and len(list((d / "panels").glob("*.png"))) == 10
    assert "Attention per level: species: Corvus corax" in _titles(run)

    main(["embeddings", str(run), "--level", "species", "--color-by", "family"])
    d = run / "analysis" / "embeddings"
    scores = json.loads((d / "species-by-family.json").read_text())["silhouette"]
    assert (d / "species-by-family.png").is_file() and all(-1 <= v <= 1 for v in scores.values())
    assert "Embedding map: species by family" in _titles(run)

    # a saved pipeline outside any run: ./analysis, no report
    pipe.save_pretrained(tmp_path / "pipe")
    monkeypatch.chdir(tmp_path)
    main(["embeddings", str(tmp_path / "pipe"), "--level", "genus", "--color-by", "family"])
    assert (tmp_path / "analysis" / "embeddings" / "genus-by-family.json").is_file()
    assert not (tmp_path / "pipe" / "report.html").exists()
    with pytest.raises(SystemExit):  # bad input: one-line error, exit 2
        main(["embeddings", str(run), "--level", "family", "--color-by", "class"])


def test_sibling_reading_counts_own_parent_and_other_siblings():
    """A judge that reads each image's species from its first pixel: known answers give known shares."""
    from types import SimpleNamespace
    from taxadiffusion.analysis.traits import sibling_reading
    lineages = [("C", "O", "F", "G", s) for s in ("a", "b", "c")]
    ids = {"a": 0, "b": 1, "c": 2, "x": 9}                  # x: a species outside the genus

    judge = SimpleNamespace(world=SimpleNamespace(taxonomy=SimpleNamespace(
        ranks=("class", "order", "family", "genus", "species"))),
        lineage_ids=lambda lins: torch.tensor([[0, 0, 0, 5, ids[lin[-1]]] for lin in lins]))
    # pixel (0, 0) of channel 0 holds the species id, of channel 0 column 1 the genus id
    judge.predict = lambda imgs: torch.cat([torch.zeros(len(imgs), 3, dtype=torch.long),
                                            imgs[:, 0, 0, 1:2].long(), imgs[:, 0, 0, 0:1].long()], 1)
    sibs = torch.zeros(3, 4, 3, 8, 8, dtype=torch.uint8)
    sibs[:, :, 0, 0, 1] = 5                                 # right genus everywhere ...
    sibs[2, 3, 0, 0, 1] = 7                                 # ... but one image of column c
    sibs[0, :, 0, 0, 0] = torch.tensor([0, 0, 1, 9])        # a: own, own, b's mark, outside
    sibs[1, :, 0, 0, 0] = torch.tensor([0, 2, 2, 2])        # b: never its own; a once, c three times
    sibs[2, :, 0, 0, 0] = 2                                 # c: always its own
    r = sibling_reading(judge, sibs, lineages)
    assert r["own"] == [0.5, 0.0, 1.0] and r["own_mean"] == pytest.approx(0.5) and r["guess"] == pytest.approx(1 / 3)
    assert r["table"]["columns"] == ["sibling", "genus acc", "own species", "another sibling"]
    assert r["table"]["rows"] == [["a", "1.00", "0.50", "0.25"], ["b", "1.00", "0.00", "1.00"],
                                  ["c", "0.75", "1.00", "0.00"]]
    with pytest.raises(ValueError, match="one lineage per sibling"):
        sibling_reading(judge, sibs, lineages[:2])
    with pytest.raises(ValueError, match="at least 2 columns"):
        sibling_reading(judge, sibs[:1], lineages[:1])


def test_traits_command_reads_the_sibling_grid_when_the_run_has_an_oracle(run, pipe, tmp_path, monkeypatch):
    """On a synthetic-world run `traits` adds the oracle's sibling reading: here a judge that always
    answers "Corvus corax", so corax's column is all its own and every sibling's is all another's."""
    from types import SimpleNamespace
    import taxadiffusion.analysis.traits as traits_mod
    tax = pipe.taxonomy
    ids = lambda lins: torch.tensor([tax.ids(tax.lookup(" > ".join(l))) for l in lins])  # noqa: E731
    corax = ids([pipe.resolve_taxon("Corvus corax")])
    judge = SimpleNamespace(lineage_ids=ids, world=SimpleNamespace(taxonomy=tax),
                            predict=lambda imgs: corax.expand(len(imgs), -1))
    monkeypatch.setattr(traits_mod, "_oracle_of", lambda run, pipe, names: judge)
    main(["traits", str(run), "--taxon", "Corvus corax", "--n", "2", "--steps", "2", "--out", str(tmp_path)])
    s = json.loads((tmp_path / "traits" / "Corvus_corax" / "settings.json").read_text())
    reading, sibs = s["sibling_oracle"], s["siblings"]
    assert len(sibs) >= 2 and reading["guess"] == pytest.approx(1 / len(sibs))
    rows = {r[0]: r for r in reading["table"]["rows"]}
    assert rows["corax"][1:] == ["1.00", "1.00", "0.00"]
    assert all(r[1:] == ["1.00", "0.00", "1.00"] for name, r in rows.items() if name != "corax")
    assert reading["own_mean"] == pytest.approx(1 / len(sibs))
