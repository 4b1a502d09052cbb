"""`taxadiffusion explore RUN`: a local web page to browse a run's taxonomy and sample it (issue 21).

    from taxadiffusion.explore import serve
    serve("runs/fish", host="127.0.0.1", port=7860)

- The taxonomy as a tree opened rank by rank (image counts, few-shot species marked) and a search box
  that takes any name, binomial or lineage path and suggests close names for a typo.
- Any node at any rank (or an unseen child of one, "Genus > new epithet"): N images with TaxaGuide,
  CFG or none, the trait row and the sibling grid as `taxadiffusion traits` makes them (with the
  synthetic world's oracle reading where the run has one), the training images of the taxon beside
  them; every grid a PNG download with the exact CLI command that reproduces it.

Why a small FastAPI app with one hand-written page rather than Gradio:
- Offline by construction. The page, its script and its style are served by the app itself and the
  responses carry a Content-Security-Policy that lets the browser talk to this server only, so no CDN
  asset, font or analytics call can leave the machine even by mistake. Gradio loads fonts and
  front-end assets, checks for updates and sends usage analytics unless each is switched off, and it
  pulls in about fifty packages; fastapi + uvicorn are three small ones.
- Full control of queueing and errors. One worker thread owns the pipeline, so requests run one at a
  time in arrival order and a second tab only waits its turn; progress comes from the pipeline's
  callback_on_step_end into a job record the page polls. Every bad input is answered as JSON
  {"error": "<one line>"} that the page shows, never a traceback (those go to the server's log).

Layout: engine.py (model, jobs, requests, CLI commands), app.py (HTTP routes, serve), page.py
(the page's HTML, CSS and JavaScript).
"""
from __future__ import annotations


EXTRA = ("fastapi", "starlette", "uvicorn")


def _app_module():
    """explore.app, or a one-line error naming the extra to install (the CLI prints ValueErrors as
    `taxadiffusion explore: error: ...`; the web packages are optional, see pyproject's extras)."""
    try:
        from . import app
    except ModuleNotFoundError as e:
        if e.name not in EXTRA:
            raise
        raise ValueError(f"the explorer needs {e.name}, which is not installed: "
                         f"pip install 'taxadiffusion[explore]' (fastapi and uvicorn)") from e
    return app


def make_app(run=None, **kw):
    """The FastAPI app for `run` (a run folder, checkpoint or saved pipeline); see app.make_app."""
    return _app_module().make_app(run, **kw)


def serve(run, host: str = "127.0.0.1", port: int = 7860, **kw) -> None:
    """Load `run` once and serve the explorer until interrupted; see app.serve."""
    _app_module().serve(run, host=host, port=port, **kw)


__all__ = ["make_app", "serve"]
