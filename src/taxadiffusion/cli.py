"""`taxadiffusion` command line: demo | prepare | train | sample | evaluate | report | traits | ...

Each subcommand is two plain functions here: one declares its arguments, one runs it by calling the
package's public functions (imported inside, so `taxadiffusion --help` does not import torch).
COMMANDS is a plain dict: name -> (help, add_arguments, run).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable


# -- prepare ---------------------------------------------------------------------------------------
def _prepare_args(p: argparse.ArgumentParser) -> None:
    from .datasets import READERS
    p.add_argument("format", choices=sorted(READERS), help="metadata format")
    p.add_argument("metadata", help="metadata file (JSON, CSV, TSV) or, for inat-folders, the image folder")
    p.add_argument("--images", required=True, help="image root the metadata's paths are relative to")
    p.add_argument("--out", default=None, help="where taxonomy.json and table.csv go (default: ./prepared)")
    p.add_argument("--ranks", default=None, help="comma list of modelled ranks (default: all the format has)")
    p.add_argument("--missing-ranks", default="drop", choices=["drop", "keep", "fill"],
                   help="rows missing a rank: drop them, keep them for the levels they have, or fill 'None'")
    p.add_argument("--strict", action="store_true", help="a name placed under two parents is an error")
    p.add_argument("--preview", action="store_true", help="write preview.png: a few images per family")
    p.add_argument("--check-images", action="store_true", help="open every image and count unreadable ones")


def _prepare(a: argparse.Namespace) -> None:
    from .datasets.prepare import prepare
    prepare(a.format, a.metadata, images=a.images, out=a.out or "prepared",
            ranks=a.ranks.split(",") if a.ranks else None, missing=a.missing_ranks,
            strict=a.strict, preview=a.preview, check_images=a.check_images)


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "prepare": ("validate metadata, print a summary, write taxonomy.json and a normalised table",
                _prepare_args, _prepare),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="taxadiffusion", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, add, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command][2](args)
    except (ValueError, KeyError, FileNotFoundError) as e:
        # user-facing errors (bad input, missing weights) print as one line, not a traceback
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"taxadiffusion {args.command}: error: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
