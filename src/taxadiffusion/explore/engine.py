"""The explorer's model side: one pipeline loaded once, one worker thread, jobs the page polls.

- The pipeline (and its scheduler, swapped per request) is touched by the worker thread only, so
  requests from any number of tabs run one at a time in arrival order and never interleave.
- A job records its progress from the pipeline's callback_on_step_end (one call per denoising step
  and batch, so `total` is known before it starts) and ends with its grids as PNG bytes, the exact
  CLI command that reproduces them, and the oracle's reading where the run has one.
- Requests are checked before they are queued (unknown taxon, n or steps out of range, a scale that
  is not a finite number, a level below the taxon, a guide level not above it): the page gets the
  message at once and nothing is queued.
"""
from __future__ import annotations

import math
import queue
import re
import shlex
import sys
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ..config import GUIDANCE
from ..taxonomy import LINEAGE_SEPARATOR
from .browse import BadInput, TaxonomyView, png_bytes

KINDS = ("sample", "traits", "siblings")
N_LIMIT = {"sample": 64, "traits": 16, "siblings": 16}  # images per column; a grid stays viewable
MAX_STEPS = 1000        # SD's training schedule has 1000 timesteps: more steps repeat them
MAX_SEED = 2**32 - 1    # exact in the page's JavaScript numbers, and far more seeds than anyone reads
MAX_SCALE = 100.0
MAX_SIBLINGS = 24
MAX_PENDING = 16        # queued + running; more is answered "busy" instead of growing without bound
KEEP_JOBS = 64          # finished jobs (and their PNGs) kept for the page to fetch ...
KEEP_BYTES = 512 << 20  # ... within this many PNG bytes (an SD grid of 64 images is ~30 MB)


class Busy(Exception):
    """The queue is full (HTTP 503)."""


def one_line(e: BaseException) -> str:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e  # str(KeyError) adds quotes
    return re.sub(r"\s*\n\s*", " ", str(msg)).strip() or type(e).__name__


def _whole(body: dict, key: str, default: int, lo: int, hi: int) -> int:
    v = body.get(key)
    if v is None or v == "":
        return default
    try:
        if isinstance(v, bool):
            raise ValueError
        f = float(v)
        if not math.isfinite(f) or f != int(f):
            raise ValueError
        v = int(f)
    except (TypeError, ValueError):
        raise BadInput(f"{key} must be a whole number from {lo} to {hi}, got {v!r}") from None
    if not lo <= v <= hi:
        raise BadInput(f"{key} must be from {lo} to {hi}, got {v}")
    return v


def _finite(body: dict, key: str, default: float, bound: float) -> float:
    v = body.get(key)
    if v is None or v == "":
        return default
    try:
        if isinstance(v, bool):
            raise ValueError
        f = float(v)
    except (TypeError, ValueError):
        raise BadInput(f"{key} must be a number, got {v!r}") from None
    if not math.isfinite(f) or abs(f) > bound:  # NaN or inf would sample black images
        raise BadInput(f"{key} must be a finite number from {-bound:g} to {bound:g}, got {v!r}")
    return f


@dataclass
class Request:
    kind: str
    names: tuple[str, ...]
    n: int
    guidance: str
    scale: float
    guide_level: int
    steps: int
    scheduler: str
    seed: int
    max_siblings: int = 12


@dataclass
class Job:
    id: str
    request: Request
    state: str = "queued"               # queued | running | done | error
    step: int = 0
    total: int = 0
    error: str | None = None
    result: dict | None = None
    pngs: dict = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None


class Explorer:
    """A run loaded once for the app: taxonomy view, request checks, job queue and worker."""

    def __init__(self, run: str | Path, device: str | None = None, scheduler: str | None = None,
                 pretrained: str | None = None):
        from ..sampling import load_for_sampling
        from ..schedulers import SCHEDULERS
        self.run = Path(run)
        self.run_text = str(run)        # as the user wrote it: the CLI commands shown reuse it
        t0 = time.time()
        self.pipe, self.sc = load_for_sampling(run, scheduler, device, pretrained=pretrained,
                                               pretrained_option="--pretrained")
        self.load_seconds = time.time() - t0
        self.model_loads = 1            # the page shows it; tests check it stays 1
        self.view = TaxonomyView(self.pipe, self.run)
        self.tax = self.pipe.taxonomy
        self.schedulers = list(SCHEDULERS)
        self.default_scheduler = scheduler or self.sc.scheduler
        # every sampler built over the training schedule, as load_for_sampling does, never chained
        self._schedule = self.pipe.scheduler.config
        self._samplers = {self.default_scheduler: self.pipe.scheduler}
        self.max_steps = min(MAX_STEPS, int(self._schedule.get("num_train_timesteps", MAX_STEPS)))
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._oracle = None
        self._oracle_note: str | None = None
        self._worker = threading.Thread(target=self._work, name="explore-worker", daemon=True)
        self._worker.start()

    def info(self) -> dict:
        sc = self.sc
        return {"run": self.run_text, "ranks": list(self.tax.ranks), "summary": self.tax.summary(),
                "few_shot_species": len(self.tax.few_shot_species()), "device": str(self.pipe.device),
                "model_loads": self.model_loads, "load_seconds": round(self.load_seconds, 2),
                "schedulers": self.schedulers, "guidance": list(GUIDANCE),
                "defaults": {"guidance": sc.guidance, "scale": sc.scale, "guide_level": sc.guide_level,
                             "steps": sc.steps, "scheduler": self.default_scheduler, "seed": 0, "n": 4,
                             "max_siblings": 12},
                "limits": {"n": N_LIMIT, "steps": self.max_steps, "seed": MAX_SEED, "scale": MAX_SCALE,
                           "max_siblings": MAX_SIBLINGS, "pending": MAX_PENDING}}

    # -- requests ----------------------------------------------------------------------------------
    def parse(self, body) -> Request:
        if not isinstance(body, dict):
            raise BadInput("the request must be a JSON object")
        kind = body.get("kind") or "sample"
        if kind not in KINDS:
            raise BadInput(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        names = self.view.resolve(body.get("taxon"))
        level = body.get("level")
        if level not in (None, ""):
            if isinstance(level, str) and level.isdigit():
                level = int(level)
            if isinstance(level, str) and level not in self.tax.ranks:
                raise BadInput(f"level must be a rank ({', '.join(self.tax.ranks)}), got {level!r}")
            try:
                names = tuple(self.pipe.resolve_taxon(LINEAGE_SEPARATOR.join(names), level))
            except (KeyError, ValueError) as e:
                raise BadInput(one_line(e)) from None
        sc = self.sc
        guidance = body.get("guidance") or sc.guidance
        if guidance not in GUIDANCE:
            raise BadInput(f"guidance must be one of {', '.join(GUIDANCE)}, got {guidance!r}")
        scheduler = body.get("scheduler") or self.default_scheduler
        if scheduler not in self.schedulers:
            raise BadInput(f"scheduler must be one of {', '.join(self.schedulers)}, got {scheduler!r}")
        req = Request(kind=kind, names=names, n=_whole(body, "n", 4, 1, N_LIMIT[kind]),
                      guidance=guidance, scale=_finite(body, "scale", sc.scale, MAX_SCALE),
                      guide_level=_whole(body, "guide_level", sc.guide_level, 0, self.tax.num_levels - 1),
                      steps=_whole(body, "steps", sc.steps, 1, self.max_steps), scheduler=scheduler,
                      seed=_whole(body, "seed", 0, 0, MAX_SEED),
                      max_siblings=_whole(body, "max_siblings", 12, 1, MAX_SIBLINGS))
        lvl = len(names) - 1
        if kind == "sample" and guidance == "taxa" and lvl and req.guide_level >= lvl:
            # the grids move the reference up per column (traits.column_guide_level); one sample can't
            raise BadInput(f"guide level {req.guide_level} ({self.tax.ranks[req.guide_level]}) must be "
                           f"above the sampled level {lvl} ({self.tax.ranks[lvl]}): TaxaGuide guides "
                           f"against an ancestor")
        return req

    def command(self, r: Request) -> str:
        """The CLI command that writes the same grid (same seeds, settings and sampler)."""
        q = shlex.quote
        taxon = q(LINEAGE_SEPARATOR.join(r.names))
        guide = f" --guide-level {r.guide_level}" if r.guidance == "taxa" else ""
        common = (f"--guidance {r.guidance} --scale {r.scale!r}{guide} --steps {r.steps} "
                  f"--scheduler {r.scheduler}")
        if r.kind == "sample":
            return (f"taxadiffusion sample {q(self.run_text)} --taxon {taxon} --n {r.n} {common} "
                    f"--seed {r.seed}")
        return (f"taxadiffusion traits {q(self.run_text)} --taxon {taxon} --n {r.n} --seed {r.seed} "
                f"{common} --max-siblings {r.max_siblings}")

    # -- jobs --------------------------------------------------------------------------------------
    def submit(self, body) -> Job:
        req = self.parse(body)
        with self._lock:
            pending = sum(j.state in ("queued", "running") for j in self._jobs.values())
            if pending >= MAX_PENDING:
                raise Busy(f"busy: {pending} requests are queued or running (at most {MAX_PENDING}); "
                           f"try again when one has finished")
            job = Job(id=uuid.uuid4().hex[:12], request=req)
            self._jobs[job.id] = job
            done = [j for j in self._jobs.values() if j.state in ("done", "error")]
            size = sum(len(b) for j in done for b in j.pngs.values())
            while done and (len(done) > KEEP_JOBS or size > KEEP_BYTES):  # oldest first
                old = done.pop(0)
                size -= sum(len(b) for b in old.pngs.values())
                del self._jobs[old.id]
        self._queue.put(job)
        return job

    def job(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def status(self, job: Job) -> dict:
        with self._lock:
            ahead = sum(1 for j in self._jobs.values() if j.state == "queued" and j.created < job.created)
            running = any(j.state == "running" for j in self._jobs.values())
        r = job.request
        return {"job": job.id, "kind": r.kind, "state": job.state, "step": job.step, "total": job.total,
                "ahead": ahead + (1 if running and job.state == "queued" else 0),
                "taxon": LINEAGE_SEPARATOR.join(r.names), "error": job.error, "result": job.result,
                "seconds": round((job.finished or time.time()) - job.started, 3) if job.started else 0.0}

    def wait(self, job: Job, timeout: float | None = None) -> Job:
        """Block until `job` ends (for scripts and tests that do not poll)."""
        end = None if timeout is None else time.time() + timeout
        while job.state in ("queued", "running") and (end is None or time.time() < end):
            time.sleep(0.01)
        return job

    def close(self) -> None:
        self._queue.put(None)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            job.state, job.started = "running", time.time()
            try:
                job.result = self._run(job)
                job.state = "done"
            except (BadInput, ValueError, KeyError) as e:  # the pipeline's own checks: a message
                job.error, job.state = one_line(e), "error"
            except Exception as e:  # a bug: one line for the page, the traceback for the server log
                traceback.print_exc(file=sys.stderr)
                job.error = (f"unexpected error (a bug?) {type(e).__name__}: {one_line(e)}; the "
                             f"server's log has the traceback")
                job.state = "error"
            finally:
                job.finished = time.time()

    def _sampler(self, name: str):
        if name not in self._samplers:
            from ..schedulers import make_scheduler
            self._samplers[name] = make_scheduler(name, self._schedule)
        return self._samplers[name]

    def _run(self, job: Job) -> dict:
        from . import grids
        r = job.request
        pipe = self.pipe
        pipe.scheduler = self._sampler(r.scheduler)
        pipe.scheduler.set_timesteps(r.steps)
        per_call = len(pipe.scheduler.timesteps) * -(-r.n // self.sc.batch_size)
        calls = {"sample": 1, "traits": len(r.names),
                 "siblings": grids.sibling_columns(pipe, r)}[r.kind]
        job.total = per_call * calls

        def tick(_pipe, _i, _t, _kw):
            job.step += 1
            return {}

        kw = dict(guidance=r.guidance, guidance_scale=r.scale, guide_level=r.guide_level,
                  num_inference_steps=r.steps, callback_on_step_end=tick, batch_size=self.sc.batch_size)
        out = getattr(grids, r.kind)(self, r, kw)
        job.pngs = {name: png_bytes(img) for name, img in out.pop("grids").items()}
        out["images"] = [{"name": name, "url": f"api/jobs/{job.id}/{name}"} for name in job.pngs]
        out["command"] = self.command(r)
        out["seed"] = r.seed
        out["settings"] = {"taxon": LINEAGE_SEPARATOR.join(r.names), "n": r.n, "guidance": r.guidance,
                           "scale": r.scale, "guide_level": r.guide_level, "steps": r.steps,
                           "scheduler": r.scheduler, "seed": r.seed}
        return out

    def oracle(self):
        """The synthetic world's oracle of this run (loaded or trained once), else None with a note."""
        if self._oracle is None and self._oracle_note is None:
            try:
                from ..evaluation.run import run_world
                world = run_world(self.run)
                if world is None:
                    self._oracle_note = "No oracle reading: this run was not trained on the synthetic world."
                else:
                    from ..evaluation.oracle import load_or_train_oracle
                    self._oracle = load_or_train_oracle(world, progress=False)
            except Exception as e:  # an oracle that fails to load must not take the grid with it
                self._oracle_note = f"No oracle reading: {one_line(e)}."
        return self._oracle
