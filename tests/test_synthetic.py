"""Synthetic world: determinism, inherited traits (by value and by pixel), long tail, names, the CSV on disk."""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from taxadiffusion.datasets.synthetic import (CSV_COLUMNS, RANKS, WorldConfig, long_tail, make_world,
                                              write_dataset)

# 4 genera of 2-3 species, a short tail: small enough to write in a fraction of a second
TINY = WorldConfig(seed=3, branching=((1, 1), (2, 2), (1, 1), (2, 2), (2, 3)), max_images=6)


@pytest.fixture(scope="module")
def world():
    return make_world(WorldConfig())


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_dataset(a, TINY)
    write_dataset(b, TINY)
    write_dataset(c, replace(TINY, seed=4))
    da, db = _digest(a), _digest(b)
    assert len(da) == sum(make_world(TINY).counts.values()) + 2      # images + metadata.csv + world.json
    assert da == db
    assert _digest(c)["metadata.csv"] != da["metadata.csv"]          # another seed: another world


def test_render_is_per_image_seeded(world):
    x5 = world.render(0, 5, seed=(1, 2))
    assert x5.shape == (5, 32, 32, 3) and x5.dtype == np.uint8
    np.testing.assert_array_equal(world.render(0, 3, seed=(1, 2)), x5[:3])   # batch size does not matter
    assert not np.array_equal(world.render(0, 5, seed=(1, 3)), x5)
    assert len({im.tobytes() for im in x5}) == 5                              # variation inside a species
    p = world.render(0, 5, seed=(1, 2), perturb=True)
    np.testing.assert_array_equal(p, world.render(0, 5, seed=(1, 2), perturb=True))
    assert np.abs(p.astype(int) - x5).mean() > 5                              # perturbation is visible
    mixed = world.render([0, 7, 0], seed=9)
    np.testing.assert_array_equal(mixed[2], world.render([0, 7, 0, 5], seed=9)[2])
    assert make_world(replace(WorldConfig(), image_size=64)).render(0, 2).shape == (2, 64, 64, 3)


def test_siblings_share_genus_traits_and_differ_in_species(world):
    pairs = 0
    for i, lin in enumerate(world.lineages):
        for j in world.siblings(i):
            ti, tj = world.traits(i), world.traits(j)
            assert all(ti[r] == tj[r] for r in RANKS[:-1])
            assert ti["species"] != tj["species"]
            pairs += 1
    assert pairs > 50
    # parents differ from their siblings in their own rank's trait, e.g. two genera of one family
    fam = {}
    for i, lin in enumerate(world.lineages):
        fam.setdefault(lin[:3], {}).setdefault(lin[3], i)
    for genera in fam.values():
        firsts = list(genera.values())
        assert len({str(world.traits(i)["genus"]) for i in firsts}) == len(firsts)


def test_sibling_differs_by_a_few_pixels_other_genus_by_many(world):
    a = 0
    b = world.siblings(a)[0]
    other = next(i for i, lin in enumerate(world.lineages) if lin[:3] == world.lineages[a][:3]
                 and lin[3] != world.lineages[a][3])
    xa, xb, xo = (world.render(i, 16, seed=11).astype(int) for i in (a, b, other))
    changed = lambda x, y: (np.abs(x - y).sum(-1) > 30).mean((1, 2))   # noqa: E731  fraction per image
    sib, gen = changed(xa, xb), changed(xa, xo)
    # same pose and background: a sibling changes only its mark (~2 discs of radius 2 px of 1024 px)
    assert 0 < sib.min() and sib.max() < 0.05
    assert gen.mean() > 3 * sib.mean()
    # the sibling swap shows a's genus with b's mark: here exactly b
    np.testing.assert_array_equal(world.render_swap(a, b, 16, seed=11), world.render(b, 16, seed=11))
    with pytest.raises(ValueError, match="not in the same"):
        world.render_swap(a, other, 4)
    assert world.render_swap(a, other, 4, rank="genus").shape == (4, 32, 32, 3)


def test_long_tail_has_one_shot_and_few_shot_species(world):
    counts = np.array(list(world.counts.values()))
    assert 60 <= len(world.lineages) <= 100
    assert (counts == 1).sum() >= 3 and ((counts >= 2) & (counts <= 5)).sum() >= 10
    assert counts.max() == 100
    assert len(world.taxonomy.few_shot_species()) == (counts <= 5).sum()
    for t in world.taxonomy.species:
        assert world.taxonomy.count(t) == world.counts[t.path]
    assert long_tail(5, 100, 1) == [100, 32, 10, 3, 1]
    # rare species are spread over genera: some genus has both a 1-shot and a 20+-image species
    by_genus = {}
    for lin, n in world.counts.items():
        by_genus.setdefault(lin[:-1], []).append(n)
    assert any(min(v) == 1 and max(v) >= 20 for v in by_genus.values())


def test_names_are_latin_looking_and_unique_per_rank(world):
    tax = world.taxonomy
    for level, rank in enumerate(RANKS):
        names = [t.name for t in tax.vocab(level)]
        assert len(set(names)) == len(names), rank
        assert all(n.isalpha() for n in names)
    assert all(t.name.endswith("idae") for t in tax.vocab(2))
    assert all(t.name.endswith("iformes") for t in tax.vocab(1))
    assert all(t.name[0].isupper() for t in tax.vocab(3)) and all(t.name.islower() for t in tax.species)
    sp = tax.species[0]
    assert world.species_id(sp.binomial) == world.species_id(sp.path) == world.species_id(sp) == 0


def test_metadata_csv_goes_through_the_generic_reader(tmp_path):
    meta = write_dataset(tmp_path, TINY)
    lines = meta.read_text().splitlines()
    assert lines[0] == ",".join(CSV_COLUMNS)
    assert CSV_COLUMNS == ("file_name", "class", "order", "family", "genus", "specific_epithet")
    from taxadiffusion.datasets import read_table
    table = read_table("csv", meta, tmp_path)
    assert table.report.rows_dropped == 0 and not table.report.warnings
    assert table.taxonomy() == make_world(TINY).taxonomy
    assert all(Path(r.path).exists() for r in table.records)


def test_write_is_idempotent_and_rewrites_on_a_new_config(tmp_path):
    meta = write_dataset(tmp_path, TINY)
    first = sorted((tmp_path / "images").iterdir())[0]
    mtime = first.stat().st_mtime_ns
    write_dataset(tmp_path, TINY)
    assert first.stat().st_mtime_ns == mtime                       # skipped: same config hash
    other = replace(TINY, seed=5)
    write_dataset(tmp_path, other)
    names = {p.name for p in (tmp_path / "images").iterdir()}
    listed = {Path(l.split(",")[0]).name for l in meta.read_text().splitlines()[1:]}
    assert names == listed                                         # old images gone, new ones listed
    assert WorldConfig.load(tmp_path) == other                    # world.json holds the config
    assert WorldConfig.from_dict(json.loads((tmp_path / "world.json").read_text())).hash() == other.hash()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="world.json"):
        write_dataset(foreign, TINY)


def test_concurrent_writers_take_turns(tmp_path):
    """Two runs started together on one data folder (benchmarks/demo_variants.py in parallel): the
    second waits for the first instead of deleting its images mid-write, and both get the dataset."""
    import multiprocessing
    import threading

    from filelock import FileLock
    out, done = tmp_path / "data", []
    with FileLock(tmp_path / ".data.lock"):                   # another writer holds the folder
        t = threading.Thread(target=lambda: done.append(write_dataset(out, TINY)))
        t.start()
        t.join(1.0)
        assert t.is_alive() and not out.exists()              # waiting, nothing written yet
    t.join(60)
    assert done == [out / "metadata.csv"]
    ref = _digest(out)
    out2 = tmp_path / "data2"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=write_dataset, args=(out2, TINY)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert _digest(out2) == ref


def test_config_validation_round_trip_and_hash():
    cfg = WorldConfig()
    assert WorldConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.hash() == WorldConfig().hash()
    assert len({cfg.hash(), replace(cfg, seed=1).hash(), replace(cfg, mark_size=0.04).hash()}) == 3
    with pytest.raises(ValueError, match="species"):
        WorldConfig(branching=((2, 2), (2, 2), (2, 2), (2, 2), (3, 13)))   # only 12 distinct marks
    with pytest.raises(ValueError, match="one \\(min, max\\) per rank"):
        WorldConfig(branching=((2, 2),))
    with pytest.raises(KeyError, match="mark_sise"):
        WorldConfig.from_dict({"mark_sise": 0.1})
    with pytest.raises(TypeError, match="rotation must be float, got 'abc'"):
        WorldConfig.from_dict({"rotation": "abc"})
    with pytest.raises(TypeError, match="mirror must be bool"):
        WorldConfig(mirror="no")
    with pytest.raises(TypeError, match="image_size must be int"):
        WorldConfig(image_size=32.0)
    assert WorldConfig(rotation=5).rotation == 5  # an int where a float is expected is fine (YAML "5")
    with pytest.raises(ValueError, match="generator version 0"):
        WorldConfig.from_dict({"generator_version": 0, "config": cfg.to_dict()})
