"""`taxadiffusion explore` (issue 21): the local web app on a tiny trained run.

HTTP API against a real uvicorn server (bad inputs answered with messages, concurrent requests, the
app's grids equal to the CLI's, latency), then the page in headless Chromium (Debian's package,
driven by Playwright; never a browser download). EXPLORE_SCREENSHOTS=docs/explore keeps the
screenshots (default: the test's tmp folder).
"""
from __future__ import annotations

import csv
import io
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinyrun import tiny_overrides, write_images

INSTALL = "the explorer's web packages are missing: pip install -e '.[explore]'"
pytest.importorskip("fastapi", reason=INSTALL)
pytest.importorskip("uvicorn", reason=INSTALL)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("train")]
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny run, with Parus major cut to 3 images so the tree has a few-shot species."""
    tmp = tmp_path_factory.mktemp("explore")
    data = write_images(tmp / "data")
    rows = list(csv.reader(open(data / "metadata.csv")))
    parus = [r for r in rows[1:] if r[-1] == "major"]
    keep = [rows[0]] + [r for r in rows[1:] if r[-1] != "major"] + parus[:3]
    with open(data / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows(keep)
    env = {**os.environ, "TAXADIFFUSION_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "taxadiffusion.cli", "train", "--config", "tiny-cpu",
           *tiny_overrides(data, tmp / "runs")]
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return tmp / "runs" / "t", env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run):
    """The app on 127.0.0.1:<free port> in a thread of this process (one model for every test)."""
    import uvicorn

    from taxadiffusion.explore import make_app
    app = make_app(tiny_run[0], device="cpu")
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    t0 = time.time()
    while not srv.started:
        assert th.is_alive() and time.time() - t0 < 60, "the server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/", app.state.explorer
    srv.should_exit = True
    th.join(10)
    app.state.explorer.close()


def call(base: str, url: str, body=None, raw: bytes | None = None) -> tuple[int, object]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(base + url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, payload, kind = r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        status, payload, kind = e.code, e.read(), e.headers.get("Content-Type", "")
    return status, (json.loads(payload) if kind.startswith("application/json") else payload)


def run_job(base: str, body: dict, timeout: float = 300) -> dict:
    status, job = call(base, "api/jobs", body)
    assert status == 202, job
    t0 = time.time()
    while job["state"] in ("queued", "running"):
        assert time.time() - t0 < timeout
        time.sleep(0.02)
        job = call(base, "api/jobs/" + job["job"])[1]
    assert job["state"] == "done", job
    return job


def png(base: str, url: str) -> Image.Image:
    status, data = call(base, url)
    assert status == 200, data
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.width > 0 and img.height > 0
    return img


def test_bad_inputs_answer_messages_and_the_server_keeps_serving(server):
    base, ex = server
    sp = "Corvus corax"
    cases = [({"taxon": "Corvus corux"}, "closest names: Corvus corax"),
             ({"taxon": sp, "n": 0}, "n must be from 1 to 64, got 0"),
             ({"taxon": sp, "n": 10000}, "n must be from 1 to 64, got 10000"),
             ({"taxon": sp, "n": 2.5}, "n must be a whole number"),
             ({"taxon": sp, "scale": "NaN"}, "scale must be a finite number"),
             ({"taxon": sp, "scale": float("inf")}, "scale must be a finite number"),
             ({"taxon": sp, "steps": 0}, "steps must be from 1"),
             ({"taxon": sp, "steps": 10**6}, "steps must be from 1"),
             ({"taxon": "Aves > Corvidae", "level": "species"}, "is below Aves > Corvidae"),
             ({"taxon": sp, "level": "kingdom"}, "level must be a rank"),
             ({"taxon": sp, "guide_level": 3}, "must be above the sampled level"),
             ({"taxon": sp, "guidance": "magic"}, "guidance must be one of"),
             ({"taxon": sp, "scheduler": "warp"}, "scheduler must be one of"),
             ({"taxon": sp, "seed": -1}, "seed must be from 0"),
             ({"taxon": sp, "kind": "movie"}, "kind must be one of"),
             ({"taxon": "Corvus > "}, "empty name"),
             ({"taxon": "Nope > nova"}, "unknown taxon 'Nope'"),
             ({"taxon": ""}, "name a taxon"),
             ({"kind": "traits", "taxon": sp, "n": 17}, "n must be from 1 to 16"),
             ([1, 2], "must be a JSON object")]
    for body, expect in cases:
        status, ans = call(base, "api/jobs", body)
        assert status == 400 and expect in ans["error"], (body, ans)
        assert "Traceback" not in ans["error"] and "\n" not in ans["error"]
    # NaN as a bare JSON literal (Python's json accepts it) and a body that is not JSON at all
    assert "finite" in call(base, "api/jobs", raw=b'{"taxon": "Corvus corax", "scale": NaN}')[1]["error"]
    assert call(base, "api/jobs", raw=b"{not json")[1]["error"] == "the request must be a JSON object"
    assert call(base, "api/jobs/nope")[0] == 404
    assert "error" in call(base, "api/nothing")[1]
    assert call(base, "api/jobs/x/y.png?download=abc")[0] == 400
    assert "unknown taxon" in call(base, "api/node?taxon=Corvus%20corux")[1]["error"]
    assert call(base, "api/search?q=")[0] == 400
    # still serving, and the model was loaded once
    job = run_job(base, {"taxon": sp, "n": 2, "steps": 3})
    assert png(base, job["result"]["images"][0]["url"]).size[0] > 0
    assert call(base, "api/info")[1]["model_loads"] == 1 == ex.model_loads


def test_two_concurrent_requests_both_succeed_one_at_a_time(server):
    base, ex = server
    bodies = [{"taxon": "Corvus corax", "n": 4, "steps": 10},
              {"kind": "siblings", "taxon": "Corvus frugilegus", "n": 2, "steps": 10}]
    results = [None, None]

    def go(i):
        results[i] = run_job(base, bodies[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(r is not None and r["state"] == "done" for r in results), results
    for r in results:
        assert r["step"] == r["total"] > 0
        assert png(base, r["result"]["images"][0]["url"]).size[0] > 0
    a, b = sorted((ex.job(r["job"]) for r in results), key=lambda j: j.started)
    assert a.finished <= b.started, "the worker ran two requests at once"


def test_tree_search_unseen_and_training_images(server):
    base, _ = server
    top = call(base, "api/tree")[1]
    assert [c["name"] for c in top["children"]] == ["Aves"] and top["children"][0]["count"] == 21
    genera = call(base, "api/tree?path=" + urllib.parse.quote("Aves > Paridae"))[1]["children"]
    parus = call(base, "api/tree?path=" + urllib.parse.quote(genera[0]["lineage"]))[1]["children"]
    assert parus[0]["label"] == "Parus major" and parus[0]["few_shot"] and parus[0]["count"] == 3
    assert top["children"][0]["few_shot_below"] == 1
    typo = call(base, "api/search?q=Corvus%20corux")[1]
    assert not typo["matches"] and typo["suggestions"][0]["label"] == "Corvus corax"
    assert "closest names: Corvus corax" in typo["message"]
    hits = call(base, "api/search?q=corvus")[1]["matches"]
    assert [h["label"] for h in hits] == ["Corvus", "Corvus corax", "Corvus frugilegus"]
    new = call(base, "api/node?taxon=" + urllib.parse.quote("Corvus > nova"))[1]
    assert new["unseen"] and new["path"] == ["Aves", "Corvidae", "Corvus", "nova"] and new["known_depth"] == 3
    info = call(base, "api/training?taxon=Corvus%20corax")[1]
    assert info["count"] == 6 and info["shown"] == 6
    assert png(base, info["url"]).size[0] > 0
    info = call(base, "api/training?taxon=" + urllib.parse.quote("Corvus > nova"))[1]
    assert info["count"] == 12 and "unseen" in info["message"]


def test_serve_prints_its_address_sends_csp_and_stops_on_ctrl_c(tiny_run):
    """serve(), what `taxadiffusion explore` calls: a taken port fails before the model loads; the
    page forbids every other host (CSP); Ctrl-C (SIGINT) ends it cleanly."""
    from taxadiffusion.explore import serve
    run, env = tiny_run
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        t0 = time.time()
        with pytest.raises(ValueError, match="cannot listen on 127.0.0.1"):
            serve(run, port=blocker.getsockname()[1])
        assert time.time() - t0 < 2
    port = _free_port()
    code = f"from taxadiffusion.explore import serve; serve({str(run)!r}, port={port}, device='cpu')"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not any("TaxaDiffusion explorer: http://127.0.0.1:" in x for x in lines):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()[-2000:]
            lines.append(line)
        base = f"http://127.0.0.1:{port}/"
        for _ in range(100):  # uvicorn binds just after the line is printed
            try:
                with urllib.request.urlopen(base, timeout=5) as r:
                    csp, html = r.headers["Content-Security-Policy"], r.read().decode()
                break
            except urllib.error.URLError:
                time.sleep(0.05)
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp
        assert "http" not in html.split("<body>")[1]  # no link to another host
        assert call(base, "api/info")[1]["model_loads"] == 1
    finally:
        proc.send_signal(2)  # SIGINT, as Ctrl-C
        rc = proc.wait(30)
    assert rc == 0, proc.stderr.read()[-2000:]


def test_trait_row_and_sibling_grid_show_the_oracle_reading_where_the_run_has_one(server):
    """As test_analysis does for `traits`: a judge that always answers "Corvus corax" stands in for
    a synthetic world's oracle; both grids then carry its tables (the tiny run has no world)."""
    from types import SimpleNamespace

    import torch
    base, ex = server
    tax = ex.tax
    ids = lambda lins: torch.tensor([tax.ids(tax.make(tuple(l))) for l in lins])  # noqa: E731
    corax = ids([("Aves", "Corvidae", "Corvus", "corax")])
    judge = SimpleNamespace(lineage_ids=ids, world=SimpleNamespace(taxonomy=tax),
                            predict=lambda imgs: corax.expand(len(imgs), -1))
    saved = ex._oracle, ex._oracle_note
    ex._oracle = judge
    try:
        t = {"taxon": "Corvus corax", "n": 2, "steps": 2}
        lv = run_job(base, {**t, "kind": "traits"})["result"]
        sib = run_job(base, {**t, "kind": "siblings"})["result"]
        genus = run_job(base, {"taxon": "Corvus", "n": 2, "steps": 2, "kind": "traits"})["result"]
    finally:
        ex._oracle, ex._oracle_note = saved
    table = lv["tables"][0]
    assert table["columns"] == ["condition up to", "class acc", "family acc", "genus acc", "species acc"]
    assert [r[0] for r in table["rows"]] == ["class", "family", "genus", "species"]
    assert table["rows"][-1][1:] == ["1.00 (1.00)"] * 4
    rows = {r[0]: r for r in sib["tables"][0]["rows"]}
    assert rows["corax"][1:] == ["1.00", "1.00", "0.00"] and rows["frugilegus"][1:] == ["1.00", "0.00", "1.00"]
    assert not genus["tables"] and "whole lineages" in genus["note"]


def _cli(command: str, out: Path, env: dict) -> float:
    """Run a shown command (taxadiffusion -> python -m taxadiffusion.cli) writing to `out`; seconds."""
    argv = shlex.split(command)
    assert argv[0] == "taxadiffusion"
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "taxadiffusion.cli", *argv[1:], "--out", str(out),
                    "--device", "cpu"], check=True, env=env, capture_output=True)
    return time.time() - t0


def _pixels(img) -> np.ndarray:
    return np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else Image.open(img).convert("RGB"))


def test_app_grids_equal_the_cli_commands_and_latency(server, tiny_run, tmp_path):
    """The shown command writes the same pixels (a non-default sampler, an unseen species too), and
    one request in the app costs its sampling plus HTTP, not a model load as the CLI does."""
    base, ex = server
    env = tiny_run[1]
    body = {"taxon": "Corvus corax", "n": 8, "steps": 25, "scheduler": "euler-a", "seed": 7,
            "guidance": "taxa", "scale": 4.5}
    t0 = time.time()
    job = run_job(base, body)
    grid = png(base, job["result"]["images"][0]["url"])
    app_s = time.time() - t0
    compute_s = ex.job(job["job"]).finished - ex.job(job["job"]).started
    cmd = job["result"]["command"]
    assert "--scheduler euler-a" in cmd and "--seed 7" in cmd and "--scale 4.5" in cmd
    cli_s = _cli(cmd, tmp_path / "sample", env)
    assert np.array_equal(_pixels(grid), _pixels(tmp_path / "sample" / "grid-seed7.png"))
    print(f"\nlatency, one request (8 images, 25 steps, TaxaGuide): app over HTTP {app_s:.2f} s "
          f"(sampling in the worker {compute_s:.2f} s, so HTTP + polling {app_s - compute_s:.2f} s); "
          f"CLI `taxadiffusion sample` {cli_s:.2f} s (process start, imports, model load, sampling); "
          f"the app loaded the model once in {ex.load_seconds:.2f} s")
    assert app_s - compute_s < 1.0 and app_s < cli_s

    t = {"taxon": "Corvus > nova", "n": 2, "steps": 5, "seed": 3, "guidance": "cfg", "scale": 2.0}
    lv = run_job(base, {**t, "kind": "traits"})
    sib = run_job(base, {**t, "kind": "siblings"})
    assert lv["result"]["command"] == sib["result"]["command"]
    _cli(lv["result"]["command"], tmp_path / "traits", env)
    folder = tmp_path / "traits" / "traits" / "Corvus_nova"
    assert np.array_equal(_pixels(png(base, lv["result"]["images"][0]["url"])),
                          _pixels(folder / "levels-seed3.png"))
    assert np.array_equal(_pixels(png(base, sib["result"]["images"][0]["url"])),
                          _pixels(folder / "siblings-seed3.png"))
    assert "not in the training taxonomy" in lv["result"]["note"]
    assert "No oracle reading" in lv["result"]["note"]  # not a synthetic-world run: skipped, said


def _browser_or_skip():
    how = ("headless Chromium from Debian's packages is needed: `apt-get install chromium "
           "chromium-driver` (and `pip install playwright`; no `playwright install`)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent: {how}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(f"playwright is not installed: {how}")
    return sync_playwright


def test_browser_search_generate_trait_row_and_siblings(server, tmp_path):
    sync_playwright = _browser_or_skip()
    base, ex = server
    shots = Path(os.environ.get("EXPLORE_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    outside, errors = [], []

    def start(page, button: str, kind: str) -> str:
        """Click `button`; the id of the job card it adds (cards are prepended, newest first)."""
        before = page.locator(f".card[data-kind={kind}]").count()
        page.click(button)
        t0 = time.time()
        while page.locator(f".card[data-kind={kind}]").count() == before:
            assert time.time() - t0 < 30, "no job card appeared"
            time.sleep(0.05)
        return page.locator(f".card[data-kind={kind}]").first.get_attribute("data-job")

    def done(page, job: str):
        page.wait_for_selector(f".card[data-job='{job}'][data-state=done] img.result", timeout=180_000)
        card = page.locator(f".card[data-job='{job}']")
        sizes = card.locator("img").evaluate_all(
            "imgs => imgs.map(i => i.complete ? [i.naturalWidth, i.naturalHeight] : [0, 0])")
        assert sizes and all(w > 0 and h > 0 for w, h in sizes), sizes
        url = card.locator("img.result").get_attribute("src")
        assert png(base, url).size[0] > 0  # the same PNG, decoded outside the browser
        return card

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        ctx = browser.new_context(viewport={"width": 1280, "height": 900})

        def only_local(route):  # the page may reach this server only (the CSP says so too)
            if route.request.url.startswith(base):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        ctx.route("**/*", only_local)
        page = ctx.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(base)
        page.wait_for_selector("#tree li[data-lineage='Aves']")

        page.fill("#q", "Corvus corux")
        page.click("#searchbtn")
        page.wait_for_selector(".suggestion")
        assert "closest names: Corvus corax" in page.inner_text("#searchout")
        page.screenshot(path=str(shots / "search-typo.png"))
        page.locator(".suggestion", has_text="Corvus corax").click()
        page.wait_for_selector("#selname:has-text('Corvus corax')")

        page.fill("#n", "0")
        page.click("#gen")
        page.wait_for_selector("#error:not([hidden])")
        assert "n must be from 1 to 64, got 0" in page.inner_text("#error")
        page.screenshot(path=str(shots / "bad-input.png"))
        page.fill("#n", "4")
        page.fill("#steps", "10")
        card = done(page, start(page, "#gen", "sample"))
        assert card.locator("img.training").count() == 1
        assert "taxadiffusion sample" in card.locator("pre.cmd").inner_text()
        page.screenshot(path=str(shots / "sample.png"))

        # a second tab asks for a sibling grid while the first asks for the trait row
        other = ctx.new_page()
        other.goto(base)
        other.wait_for_selector("#tree li[data-lineage='Aves']")
        other.fill("#q", "Pica pica")
        other.click("#searchbtn")
        other.locator("#searchout .hit", has_text="Pica pica").click()
        other.wait_for_selector("#selname:has-text('Pica pica')")
        other.fill("#steps", "10")
        first, second = start(page, "#traits", "traits"), start(other, "#sibs", "siblings")
        done(page, first)
        done(other, second)
        done(page, start(page, "#sibs", "siblings"))
        page.screenshot(path=str(shots / "traits-siblings.png"), full_page=True)

        # an unseen species under a known genus, from the genus's panel
        page.locator("#selected .crumbs .pick", has_text="Corvus").click()
        page.wait_for_selector("#newname")
        page.fill("#newname", "nova")
        page.click("#usenew")
        page.wait_for_selector("#selname:has-text('Corvus nova')")
        card = done(page, start(page, "#traits", "traits"))
        assert "Corvus > nova" in card.locator("pre.cmd").inner_text()
        page.screenshot(path=str(shots / "unseen-species.png"))
        browser.close()
    assert not outside, f"the page tried to reach other hosts: {outside}"
    assert not errors, errors
    assert ex.model_loads == 1
