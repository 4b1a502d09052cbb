"""HTTP routes of the explorer (FastAPI) and `serve` (uvicorn). Why FastAPI: see __init__.py.

Every answer is JSON or a PNG. A bad request is {"error": "<one line>"} with status 400 (a full
queue 503, an unknown job or path 404), an unexpected failure {"error": ...} with status 500 and its
traceback in the server's log only; the server keeps serving after any of them.
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from . import page
from .browse import BadInput
from .engine import Busy, Explorer, one_line

# The browser may load and fetch from this server only: no CDN, font, analytics or other host,
# even if a later edit of the page tried to (the offline promise, enforced by the browser).
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "Referrer-Policy": "no-referrer",
           "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


def _offline_env() -> None:
    """Nothing leaves the machine: no hub downloads or telemetry from the libraries a run loads."""
    for k in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "DISABLE_TELEMETRY", "DO_NOT_TRACK",
              "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(k, "1")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=HEADERS)


def make_app(run: str | Path | None = None, *, explorer: Explorer | None = None,
             device: str | None = None, scheduler: str | None = None,
             pretrained: str | None = None) -> FastAPI:
    """The app for `run`, loaded once here (or an `explorer` already loaded, to share one model)."""
    _offline_env()
    ex = explorer or Explorer(run, device=device, scheduler=scheduler, pretrained=pretrained)
    app = FastAPI(title="TaxaDiffusion explorer", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.explorer = ex

    @app.exception_handler(BadInput)
    async def _bad(_req, e: BadInput):
        return _error(400, one_line(e))

    @app.exception_handler(Busy)
    async def _busy(_req, e: Busy):
        return _error(503, one_line(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, e: RequestValidationError):  # e.g. ?download=abc
        err = (e.errors() or [{}])[0]
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "path", "body"))
        return _error(400, f"{where or 'request'}: {err.get('msg', 'invalid value')}")

    @app.exception_handler(HTTPException)
    async def _http(_req, e: HTTPException):
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _bug(_req, e: Exception):
        traceback.print_exception(e, file=sys.stderr)
        return _error(500, f"unexpected error (a bug?) {type(e).__name__}: {one_line(e)}; the "
                           f"server's log has the traceback")

    def js(data, status: int = 200) -> JSONResponse:
        return JSONResponse(data, status_code=status, headers=HEADERS)

    @app.get("/", response_class=HTMLResponse)
    def index():
        return HTMLResponse(page.HTML, headers=HEADERS)

    @app.get("/app.js")
    def script():
        return Response(page.SCRIPT, media_type="text/javascript", headers=HEADERS)

    @app.get("/style.css")
    def style():
        return Response(page.STYLE, media_type="text/css", headers=HEADERS)

    @app.get("/api/info")
    def info():
        return js(ex.info())

    @app.get("/api/tree")
    def tree(path: str = ""):
        return js(ex.view.children(path))

    @app.get("/api/search")
    def search(q: str = ""):
        return js(ex.view.search(q))

    @app.get("/api/node")
    def node(taxon: str = ""):
        return js(ex.view.describe(ex.view.resolve(taxon)))

    @app.get("/api/training")
    def training(taxon: str = ""):
        info, png = ex.view.training(taxon)
        if png is not None:
            info["url"] = "api/training.png?taxon=" + _quote(taxon)
        return js(info)

    @app.get("/api/training.png")
    def training_png(taxon: str = ""):
        _, png = ex.view.training(taxon)
        if png is None:
            return _error(404, "no training images of this taxon")
        return Response(png, media_type="image/png", headers=HEADERS)

    @app.post("/api/jobs")
    async def submit(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise BadInput("the request must be a JSON object") from None
        job = ex.submit(body)
        return js(ex.status(job), status=202)

    @app.get("/api/jobs/{job_id}")
    def status(job_id: str):
        job = ex.job(job_id)
        if job is None:
            return _error(404, f"no job {job_id!r} (finished jobs are kept for a while, then dropped)")
        return js(ex.status(job))

    @app.get("/api/jobs/{job_id}/{name}")
    def png(job_id: str, name: str, download: int = 0):
        job = ex.job(job_id)
        if job is None or name not in job.pngs:
            return _error(404, f"no image {name!r} of job {job_id!r}")
        headers = dict(HEADERS)
        if download:
            headers["Content-Disposition"] = f'attachment; filename="{name}"'
        return Response(job.pngs[name], media_type="image/png", headers=headers)

    return app


def _check_port(host: str, port: int) -> None:
    """ValueError (one line from the CLI) if uvicorn could not listen on host:port."""
    import socket
    if not 0 < int(port) < 65536:
        raise ValueError(f"port must be from 1 to 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"host {host!r} is not an address of this machine: {e}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind(addr)
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}); is another explorer "
                             f"running? Pass another --port") from None


def _quote(text: str) -> str:
    from urllib.parse import quote
    return quote(text, safe="")


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 7860, *, device: str | None = None,
          scheduler: str | None = None, pretrained: str | None = None,
          log_level: str = "warning") -> None:
    """Load `run` once, then serve the explorer on http://host:port until Ctrl-C."""
    import uvicorn
    _check_port(host, port)  # before the model loads: a taken port fails in a second, not after it
    app = make_app(run, device=device, scheduler=scheduler, pretrained=pretrained)
    ex = app.state.explorer
    print(f"loaded {run} on {ex.pipe.device} in {ex.load_seconds:.1f} s ({ex.tax!r})")
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: listening on {host}: anyone who can reach this machine can use the explorer")
    print(f"TaxaDiffusion explorer: http://{'[' + host + ']' if ':' in host else host}:{port}/ "
          f"(Ctrl-C stops it)", flush=True)
    uvicorn.run(app, host=host, port=int(port), log_level=log_level, server_header=False,
                date_header=False)
