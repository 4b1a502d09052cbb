"""`taxadiffusion` command line: demo | prepare | train | sample | evaluate | report | traits | ...

Each subcommand is two plain functions here: one declares its arguments, one runs it by calling the
package's public functions (imported inside, so `taxadiffusion --help` does not import torch).
COMMANDS is a plain dict: name -> (help, add_arguments, run). Numbers are checked by the small
argparse types below, config values by config.py; `main` turns every expected failure into one line
`taxadiffusion CMD: error: ...` (exit 2) and an unexpected one into one line (exit 1) whose traceback
`--debug` (or TAXADIFFUSION_DEBUG=1) shows.
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import re
import sys
from typing import Callable

from .config import GUIDANCE, SCHEDULERS


# -- argparse types: a bad number is argparse's one-line usage error, before anything loads -------------
def _int(text: str, lo: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
    if v < lo:
        raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {v}")
    return v


def positive_int(text: str) -> int:
    return _int(text, 1)


def nonneg_int(text: str) -> int:
    return _int(text, 0)


def finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):  # NaN or inf would sample black images
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def positive_float(text: str) -> float:
    v = finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


def fraction_pair(text: str) -> str:
    """'start,stop' with 0 <= start <= stop <= 1; returned as given (the commands parse it)."""
    parts = text.split(",")
    try:
        a, b = (float(x) for x in parts)
    except ValueError:
        a = b = math.nan
    if not 0 <= a <= b <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected start,stop fractions with 0 <= start <= stop <= 1 "
                                         f"(e.g. 0,0.6), got {text!r}")
    return text


# -- prepare ---------------------------------------------------------------------------------------
def _prepare_args(p: argparse.ArgumentParser) -> None:
    from .datasets import READERS
    p.add_argument("format", choices=sorted(READERS), help="metadata format")
    p.add_argument("metadata", help="metadata file (JSON, CSV, TSV) or, for inat-folders, the image folder")
    p.add_argument("--images", required=True, help="image root the metadata's paths are relative to")
    p.add_argument("--out", default=None, help="where taxonomy.json and table.csv go (default: ./prepared)")
    p.add_argument("--ranks", default=None, help="comma list of modelled ranks (default: all the format has)")
    p.add_argument("--missing-ranks", default="fill", choices=["drop", "keep", "fill"],
                   help="rows missing a rank: drop them, keep them for the levels they have, or fill 'None'")
    p.add_argument("--strict", action="store_true", help="a name placed under two parents is an error")
    p.add_argument("--preview", action="store_true", help="write preview.png: a few images per family")
    p.add_argument("--check-images", action="store_true", help="open every image and count unreadable ones")
    p.add_argument("--no-check-files", dest="check_files", action="store_false",
                   help="do not look up each image file (by default every file is checked; missing "
                        "ones are dropped, counted and listed, an error under --strict)")


def _prepare(a: argparse.Namespace) -> None:
    from .datasets.prepare import prepare
    prepare(a.format, a.metadata, images=a.images, out=a.out or "prepared",
            ranks=a.ranks.split(",") if a.ranks else None, missing=a.missing_ranks,
            strict=a.strict, preview=a.preview, check_images=a.check_images,
            check_files=a.check_files)


# -- train -----------------------------------------------------------------------------------------------
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML preset path or name (tiny-cpu, sd15-fishnet, ...)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=/data train.batch_size=8")
    p.add_argument("--stages", default=None, help="'all', a stage index, or a comma list (train.stages)")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--resume-anyway", action="store_true",
                   help="resume even where the checkpoint's config or data differ from this run's "
                        "(refused otherwise, naming the fields)")
    p.add_argument("--output_dir", default=None, help="parent of the run folder (train.output_dir)")
    p.add_argument("--name", default=None, help="run name: the folder under output_dir")


def _train(a: argparse.Namespace) -> None:
    from .config import load_config
    extra = [f"train.stages={a.stages}"] if a.stages else []
    extra += [f"train.output_dir={a.output_dir}"] if a.output_dir else []
    extra += [f"name={a.name}"] if a.name else []
    cfg = load_config(a.config, list(a.overrides) + extra)  # a bad value fails before torch loads
    from .training import train
    run = train(cfg, resume=a.resume, resume_anyway=a.resume_anyway)
    print(f"run folder: {run}")


# -- sample ------------------------------------------------------------------------------------------------
def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder, checkpoint folder or saved pipeline")
    p.add_argument("--taxon", required=True, help='binomial, name, or lineage "A > B > C" (may end unseen)')
    p.add_argument("--level", default=None, help="rank (or level index) to sample at; default: the taxon's")
    p.add_argument("--n", type=positive_int, default=16, help="number of images")
    p.add_argument("--guidance", default=None, choices=GUIDANCE)
    p.add_argument("--scale", type=finite_float, default=None,
                   help="guidance scale s (diffusers convention; s = 1 + w)")
    p.add_argument("--guide-level", type=nonneg_int, default=None, help="TaxaGuide reference level (paper: 0)")
    p.add_argument("--guidance-interval", type=fraction_pair, default=None,
                   help="start,stop fractions, e.g. 0,0.6")
    p.add_argument("--steps", type=positive_int, default=None, help="inference steps")
    p.add_argument("--scheduler", default=None, choices=SCHEDULERS)
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--out", default=None, help="output folder (default: RUN/samples/<taxon>)")
    p.add_argument("--all-levels", action="store_true",
                   help="trait-discovery row: the same seeds at every level from 0 to the taxon's")
    p.add_argument("--pretrained", default=None, metavar="PATH",
                   help="Stable Diffusion v1.5 folder (or hub id) of an SD-based run, instead of "
                        "its config's model.pretrained (when the folder moved)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")


def _sample(a: argparse.Namespace) -> None:
    from .sampling import sample_command
    sample_command(a)


# -- evaluate ----------------------------------------------------------------------------------------------
def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder, checkpoint folder or saved pipeline")
    p.add_argument("--real", default=None,
                   help="real images to compare with: metadata file (default: the run's training data)")
    p.add_argument("--real-format", default=None, help="format of --real (default: the run's)")
    p.add_argument("--real-root", default=None, help="image root of --real (default: the run's)")
    p.add_argument("--split", default="train", help="name of the real split, for the feature cache key")
    p.add_argument("--n-per-taxon", type=positive_int, default=None, help="generated images per taxon")
    p.add_argument("--levels", nargs="+", default=None, help="ranks to evaluate (default: every level)")
    p.add_argument("--max-taxa", type=positive_int, default=None, help="at most this many taxa per level (seeded)")
    p.add_argument("--species", nargs="+", default=None,
                   help="evaluate these species (binomials or lineages) and their ancestors only")
    p.add_argument("--metrics", default=None,
                   help="comma list of fid,lpips,bioclip,oracle,judge (default: oracle on the "
                        "synthetic world, else fid,lpips,bioclip); judge: a CNN trained on the real "
                        "photos, for machines without the metric weights (evaluation/judge.py)")
    p.add_argument("--guidance", default=None, choices=GUIDANCE)
    p.add_argument("--scale", type=finite_float, default=None)
    p.add_argument("--steps", type=positive_int, default=None)
    p.add_argument("--scheduler", default=None, choices=SCHEDULERS)
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--fid-weights", default=None, metavar="PATH",
                   help="FID Inception weights file (default: torch hub's cache)")
    p.add_argument("--alexnet-weights", default=None, metavar="PATH",
                   help="AlexNet weights for LPIPS (default: torch hub's cache)")
    p.add_argument("--bioclip", default=None, help="BioCLIP: hf-hub:imageomics/bioclip (cache) or a folder")
    p.add_argument("--pretrained", default=None, metavar="PATH",
                   help="Stable Diffusion v1.5 folder (or hub id) of an SD-based run, instead of "
                        "its config's model.pretrained (when the folder moved)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/eval/<settings>)")
    p.add_argument("--device", default=None)


def _evaluate(a: argparse.Namespace) -> None:
    from .evaluation.run import evaluate_command
    evaluate_command(a)


# -- demo and report ----------------------------------------------------------------------------------------
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="demo folder (rerun to continue after a stop)")
    p.add_argument("--minutes", type=positive_float, default=None,
                   help="scale the training budget to about this many minutes (default: the preset's)")


def _demo(a: argparse.Namespace) -> None:
    from .demo import demo
    demo(a.out, minutes=a.minutes)


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder")


def _report(a: argparse.Namespace) -> None:
    from .report import build_report
    print(f"wrote {build_report(a.run)}")


# -- export (issue 19) ------------------------------------------------------------------------------------
def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder (its latest checkpoint) or checkpoint folder")
    p.add_argument("out", help="new folder for the export (diffusers layout)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO",
                   help="upload the folder to this hub model repo (needs a network and a token)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: a private repo")
    p.add_argument("--scheduler", default=None, choices=SCHEDULERS, help="sampler saved (default: the run's)")
    p.add_argument("--base-model", default=None, help="card: hub id of the base model (default: from the config)")
    p.add_argument("--dataset", action="append", default=[], metavar="ID",
                   help="card: hub dataset id trained on (repeatable)")
    p.add_argument("--license", default=None, help="card: licence (default: SD v1.5's for SD runs, else mit)")
    p.add_argument("--sample-steps", type=positive_int, default=20, help="steps of the card's trait grid")
    p.add_argument("--sample-images", type=positive_int, default=4, help="seeds per row of the card's trait grid")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it holds an earlier export")
    p.add_argument("--device", default=None, help="device for the trait grid (default: cuda if available)")
    p.add_argument("--pretrained", default=None,
                   help="SD v1.5 folder of an SD-based run whose base moved (default: its config's)")


def _export(a: argparse.Namespace) -> None:
    from .export import export_run
    out = export_run(a.run, a.out, scheduler=a.scheduler, push_to_hub=a.push_to_hub,
                     private=a.private, base_model=a.base_model, datasets=a.dataset,
                     license=a.license, sample_steps=a.sample_steps, sample_images=a.sample_images,
                     overwrite=a.overwrite, device=a.device, pretrained=a.pretrained)
    print(f"wrote {out}" + (f" and uploaded it to {a.push_to_hub}" if a.push_to_hub else ""))


# -- analysis: traits, attention, embeddings (issue 8) -------------------------------------------------------
def _analysis_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder, checkpoint folder or saved pipeline")
    p.add_argument("--out", default=None,
                   help="output folder (default: RUN/analysis; ./analysis for a saved pipeline outside a run)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")


def _sampling_common(p: argparse.ArgumentParser, n: int) -> None:
    p.add_argument("--taxon", required=True, help='binomial, name, or lineage "A > B > C"')
    p.add_argument("--n", type=positive_int, default=n, help="images per column (one row per image)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--guidance", default=None, choices=GUIDANCE)
    p.add_argument("--scale", type=finite_float, default=None,
                   help="guidance scale s (diffusers convention; s = 1 + w)")
    p.add_argument("--guide-level", type=nonneg_int, default=None, help="TaxaGuide reference level (paper: 0)")
    p.add_argument("--steps", type=positive_int, default=None, help="inference steps")
    p.add_argument("--scheduler", default=None, choices=SCHEDULERS)


def _traits_args(p: argparse.ArgumentParser) -> None:
    _analysis_common(p)
    _sampling_common(p, 4)
    p.add_argument("--max-siblings", type=positive_int, default=12, help="at most this many sibling columns")


def _traits(a: argparse.Namespace) -> None:
    from .analysis.traits import traits_command
    traits_command(a)


def _attention_args(p: argparse.ArgumentParser) -> None:
    _analysis_common(p)
    _sampling_common(p, 2)
    p.add_argument("--window", type=fraction_pair, default="0,1",
                   help="start,stop fractions of the denoising steps to average over (default: all)")


def _attention(a: argparse.Namespace) -> None:
    from .analysis.attention import attention_command
    attention_command(a)


def _embeddings_args(p: argparse.ArgumentParser) -> None:
    _analysis_common(p)
    p.add_argument("--level", required=True, help="rank (or level index) whose embeddings to map")
    p.add_argument("--color-by", default=None, help="a higher rank to colour and score by (default: the parent rank)")
    p.add_argument("--max-taxa", type=positive_int, default=None,
                   help="a seeded random subset of at most this many taxa")
    p.add_argument("--perplexity", type=positive_float, default=None,
                   help="t-SNE perplexity (default: (n-1)/3 in [1, 30])")
    p.add_argument("--seed", type=nonneg_int, default=0)


def _embeddings(a: argparse.Namespace) -> None:
    from .analysis.embeddings import embeddings_command
    embeddings_command(a)


# -- explore (issue 21) ---------------------------------------------------------------------------------
def _explore_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder, checkpoint folder or saved pipeline")
    p.add_argument("--port", type=positive_int, default=7860, help="port to listen on (default: 7860)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--scheduler", default=None, choices=SCHEDULERS,
                   help="the page's default sampler (default: the run's)")
    p.add_argument("--pretrained", default=None, metavar="PATH",
                   help="Stable Diffusion v1.5 folder (or hub id) of an SD-based run, instead of "
                        "its config's model.pretrained (when the folder moved)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")


def _explore(a: argparse.Namespace) -> None:
    from .explore import serve
    serve(a.run, host=a.host, port=a.port, device=a.device, scheduler=a.scheduler,
          pretrained=a.pretrained)


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "demo": ("the whole method on the embedded synthetic world, CPU, about 20 minutes",
             _demo_args, _demo),
    "prepare": ("validate metadata, print a summary, write taxonomy.json and a normalised table",
                _prepare_args, _prepare),
    "train": ("train one stage or all of them (progressive, all, random, lora-text, full)",
              _train_args, _train),
    "sample": ("sample a taxon with TaxaGuide/CFG: a PNG per image named by seed, and a grid",
               _sample_args, _sample),
    "evaluate": ("FID/KID by level, LPIPS, BioCLIP, oracle; per-class and few-shot tables",
                 _evaluate_args, _evaluate),
    "report": ("rebuild RUN/report.html from its sections", _report_args, _report),
    "traits": ("trait discovery: one lineage at every level, and its siblings, with the same seeds",
               _traits_args, _traits),
    "attention": ("cross-attention maps of each level's contribution over the generated image",
                  _attention_args, _attention),
    "embeddings": ("t-SNE of one level's learned embeddings vs the text encoder's, with silhouette scores",
                   _embeddings_args, _embeddings),
    "export": ("a run as a diffusers pipeline folder with a model card; optionally pushed to the hub",
               _export_args, _export),
    "explore": ("a local web page to browse the taxonomy and sample any taxon (offline)",
                _explore_args, _explore),
}


# errno values of an OSError that are the machine's state, not a bug: disk full, read-only, no access
_EXPECTED_ERRNO = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


def _expected(e: BaseException) -> bool:
    """A failure the user can act on (bad input, missing or unreadable file, full disk), not a bug."""
    if isinstance(e, TypeError):
        return hasattr(e, "config_keys")  # a config value of the wrong type; other TypeErrors are bugs
    if isinstance(e, (ValueError, KeyError, FileNotFoundError, FileExistsError, PermissionError,
                      IsADirectoryError, NotADirectoryError)):  # json.JSONDecodeError is a ValueError
        return True
    if isinstance(e, OSError) and e.errno in _EXPECTED_ERRNO:
        return True
    import yaml
    if isinstance(e, yaml.YAMLError):
        return True
    try:
        from safetensors import SafetensorError  # a truncated or foreign weights file
    except ImportError:
        return False
    return isinstance(e, SafetensorError)


def _one_line(e: BaseException) -> str:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e  # str(KeyError) adds quotes
    return re.sub(r"\s*\n\s*", " ", str(msg)).strip() or type(e).__name__


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="taxadiffusion", description=__doc__.splitlines()[0])
    debug_help = "show the traceback of a failure (also TAXADIFFUSION_DEBUG=1)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    common = argparse.ArgumentParser(add_help=False)  # --debug also after the command
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, add, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_, parents=[common]))
    # dotted overrides may come before or after options (argparse stops positionals at an option)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    debug = args.debug or bool(os.environ.get("TAXADIFFUSION_DEBUG"))
    where = f"taxadiffusion {args.command}"
    try:
        COMMANDS[args.command][2](args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{where}: interrupted", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT, as a shell reports it
    except Exception as e:
        if debug:
            raise
        if _expected(e):  # user-facing errors (bad input, missing weights) print as one line
            print(f"{where}: error: {_one_line(e)}", file=sys.stderr)
            sys.exit(2)
        print(f"{where}: unexpected error (a bug?) {type(e).__name__}: {_one_line(e)}; "
              f"rerun with --debug for the traceback", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
