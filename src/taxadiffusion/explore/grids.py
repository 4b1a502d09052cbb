"""What each job kind makes, with the same functions and grid layouts as the CLI, so the PNG a page
downloads is the one its shown command writes (`taxadiffusion sample`: grid-seed<S>.png;
`taxadiffusion traits`: levels-seed<S>.png and siblings-seed<S>.png).

Each returns {"grids": {file name: PIL image}, "title", "note", "tables": [...]} for engine._run.
"""
from __future__ import annotations

from ..analysis.traits import (emergence_table, level_label, oracle_emergence, pixel_change_text,
                               pixel_changes, seed_grid, short_label, shown_siblings, sibling_grid,
                               sibling_reading, trait_grid)
from ..imaging import labelled_grid
from ..taxonomy import LINEAGE_SEPARATOR


def _lineage(r) -> str:
    return LINEAGE_SEPARATOR.join(r.names)


def _unseen_note(ex, r) -> str:
    unseen = len(r.names) - ex.pipe.known_depth(r.names)
    if not unseen:
        return ""
    return (f"The last {unseen} name(s) are not in the training taxonomy; they are conditioned "
            f"through their own prompts and level encoders.")


def sibling_columns(pipe, r) -> int:
    return len(shown_siblings(pipe, _lineage(r), r.max_siblings)[0])


def sample(ex, r, kw) -> dict:
    """N images of one taxon at its level: sample_command's grid (rows of at most 8)."""
    imgs = ex.pipe(_lineage(r), num_images=r.n, seed=r.seed, output_type="uint8", progress=False,
                   **kw).images
    ncol = min(8, r.n)
    rows = [imgs[i:i + ncol] for i in range(0, r.n, ncol)]
    grid = labelled_grid(rows, [], [], cell=max(96, imgs.shape[-1]))
    seeds = (f"Image #i draws its noise from (seed {r.seed}, i): the same seed gives the same "
             f"images at any n and batch size.")
    return {"grids": {f"grid-seed{r.seed}.png": grid},
            "title": f"{r.n} images of {level_label(ex.tax.ranks, r.names)} (guidance {r.guidance})",
            "note": " ".join(filter(None, [_unseen_note(ex, r), seeds])), "tables": []}


def traits(ex, r, kw) -> dict:
    """The trait row: the lineage at every level 0 ... its own, the same seeds in every column."""
    pipe, ranks = ex.pipe, ex.tax.ranks
    levels, labels = trait_grid(pipe, _lineage(r), r.n, r.seed, **kw)
    cols = [short_label(ranks, r.names[: lvl + 1]) for lvl in range(len(r.names))]
    grid = seed_grid(levels, cols, r.seed)
    tables, notes = [], [_unseen_note(ex, r)]
    if len(r.names) > 1:
        changes = pixel_changes(levels)
        notes.append("What each column changes: " + pixel_change_text(changes, ranks[: len(r.names)]) + ".")
    oracle = _oracle_for(ex, r, notes)
    if oracle is not None:
        m, ref = oracle_emergence(oracle, [levels], [r.names])
        tables.append({"caption": "The synthetic world's oracle on the trait row: share of column k's "
                                  "images that show the taxon's own ancestor at each rank, measured "
                                  "(ideal).", **emergence_table(m, ref, ranks)})
    return {"grids": {f"levels-seed{r.seed}.png": grid},
            "title": "Trait row: " + " \u2192 ".join(labels),
            "note": " ".join(n for n in notes if n), "tables": tables}


def siblings(ex, r, kw) -> dict:
    """The sibling grid: every child of the taxon's parent, the same seeds in every column."""
    pipe = ex.pipe
    sib, labels, total = sibling_grid(pipe, _lineage(r), r.n, r.seed, r.max_siblings, **kw)
    shown, _ = shown_siblings(pipe, _lineage(r), r.max_siblings)
    grid = seed_grid(sib, labels, r.seed)
    parent = r.names[-2] if len(r.names) > 1 else "the top rank"
    notes = [_unseen_note(ex, r),
             (f"Showing {len(labels)} of {total} siblings (max siblings {r.max_siblings}: the taxon "
              f"itself and the first others in name order)." if total > len(labels) else
              f"All {total} sibling(s) under {parent}; the columns differ only in the last name.")]
    if len(shown) > 1:  # the taxon's own column gives the two-seeds scale
        own = shown.index(tuple(r.names))
        notes.append("Without a judge: " + pixel_change_text(pixel_changes(sib[own:own + 1], sib), []) + ".")
    tables = []
    oracle = _oracle_for(ex, r, notes)
    if oracle is not None and len(shown) > 1:
        reading = sibling_reading(oracle, sib, shown)
        tables.append({"caption": f"The synthetic world's oracle on the sibling grid: own "
                                  f"{ex.tax.ranks[-1]} {reading['own_mean']:.2f} on average against a "
                                  f"guess of {reading['guess']:.2f}.", **reading["table"]})
    return {"grids": {f"siblings-seed{r.seed}.png": grid},
            "title": f"Siblings under {parent}: " + ", ".join(labels),
            "note": " ".join(n for n in notes if n), "tables": tables}


def _oracle_for(ex, r, notes: list):
    """The oracle where `traits` would use it (a whole lineage on a synthetic-world run), else None
    with the reason added to `notes`."""
    oracle = ex.oracle()
    if oracle is None:
        notes.append(ex._oracle_note or "")
        return None
    if len(r.names) != ex.tax.num_levels:
        notes.append("The oracle reads whole lineages (species) only.")
        return None
    return oracle
