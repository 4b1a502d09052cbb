"""The generated documentation pages are current, and the docs build without a warning.

docs/config.md and docs/results.md are written by tools/gen_docs.py; these tests regenerate them in
memory and compare. When one fails after a change to config.py or benchmarks/results/*.json, run
`python tools/gen_docs.py` and commit the pages.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HINT = "stale; run `python tools/gen_docs.py` and commit docs/"


def _gen():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "tools" / "gen_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _same(name: str, fresh: str) -> None:
    committed = (ROOT / "docs" / name).read_text()
    if committed != fresh:
        diff = "".join(list(difflib.unified_diff(committed.splitlines(True), fresh.splitlines(True),
                                                 f"docs/{name} (committed)", "regenerated"))[:40])
        pytest.fail(f"docs/{name} is {HINT}\n{diff}")


def test_config_reference_is_current():
    _same("config.md", _gen().generate()["config.md"])


def test_config_reference_lists_every_field():
    from taxadiffusion.config import Config
    page = _gen().config_page()
    hints = typing.get_type_hints(Config)
    for sec in dataclasses.fields(Config):
        cls = hints[sec.name]
        if dataclasses.is_dataclass(cls):
            for f in dataclasses.fields(cls):
                assert f"`{sec.name}.{f.name}`" in page, f"{sec.name}.{f.name} missing"


def test_field_comments_are_read_from_the_source():
    src = ("from dataclasses import dataclass\n@dataclass\nclass S:\n"
           "    a: int = 1            # trailing meaning\n"
           "    # block above\n    # second line\n    b: str = 'x'\n"
           "    c: float = 0.5\n")
    got = _gen().field_comments(src)
    assert got[("S", "a")] == "trailing meaning"
    assert got[("S", "b")] == "block above second line"
    assert got[("S", "c")] == ""


def test_results_tables_match_benchmark_json():
    gen = _gen()
    page = gen.results_page()
    assert "{{table:" not in page
    _same("results.md", page)


def test_readme_is_a_users_readme():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert 150 <= len(lines) <= 200, len(lines)
    assert lines[3].startswith("make demo") and lines[4].startswith("make test")


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or
                    importlib.util.find_spec("material") is None,
                    reason="mkdocs / mkdocs-material not installed (pip install -e '.[docs]' or make docs)")
def test_mkdocs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                        str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "site" / "results" / "index.html").exists()
