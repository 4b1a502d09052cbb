"""Grouping helpers, few-shot buckets, the per-class table (paper Table S2), metrics.json + metrics.md.

Metric functions (fid.py, lpips.py, bioclip.py) return plain dicts with a "kind", a "provenance" block
(library + version, weights identity, resolution, settings, definition; see weights.provenance) and
per-taxon entries keyed by `Taxon`. Here those are grouped (species -> ancestor at a level, few-shot
bucket), laid out as tables, and written: `metrics.json` (every number with the provenance of the
metric it came from) and `metrics.md` (the tables and a "how each number was obtained" section).
No torch import at module level: tables can be rebuilt from JSON alone.
"""
from __future__ import annotations

import json
import math
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..taxonomy import Taxon, Taxonomy

# Few-shot buckets by training images per species (paper Sec. 4.4 calls 1-5 images few-shot).
BUCKETS = ("1", "2-5", "6-20", ">20")


def bucket_of(count: int) -> str:
    """The few-shot bucket of a species with `count` training images."""
    if count < 1:
        raise ValueError(f"a species with {count} training images has no few-shot bucket")
    return "1" if count == 1 else "2-5" if count <= 5 else "6-20" if count <= 20 else ">20"


def taxon_seed(seed: int, taxon: Taxon | Sequence[str]) -> int:
    """A per-taxon seed from the lineage path, not dict order, so pairs and subsets are reproducible."""
    path = taxon.path if isinstance(taxon, Taxon) else tuple(taxon)
    return (seed * 1_000_003 + zlib.crc32("\x1f".join(path).encode())) % (2**63)


def _level(taxonomy: Taxonomy, level: int | str) -> int:
    return taxonomy.level_of(level) if isinstance(level, str) else int(level)


def ancestor_at(taxonomy: Taxonomy, taxon: Taxon, level: int | str) -> Taxon:
    """The ancestor of `taxon` at `level` (an index or a rank name); the taxon itself at its own level."""
    lvl = _level(taxonomy, level)
    if lvl > taxon.level:
        raise ValueError(f"{taxon} (level {taxon.level}) has no ancestor at level {lvl}")
    return taxonomy.make(taxon.path[:lvl + 1])


def group_by_level(values: Mapping[Taxon, Any], taxonomy: Taxonomy, level: int | str) -> dict[Taxon, dict]:
    """{ancestor at `level`: {taxon: value}} - e.g. per-species values grouped by class."""
    out: dict[Taxon, dict] = {}
    for t in sorted(values):
        out.setdefault(ancestor_at(taxonomy, t, level), {})[t] = values[t]
    return out


def _finite(taxon: Taxon, v: Any) -> float:
    if v is None or not math.isfinite(float(v)):
        raise ValueError(f"{' > '.join(taxon.path)} ({taxon.rank}): value {v!r} is missing or not "
                         f"finite; leave such species out explicitly (and report them) first")
    return float(v)


def by_bucket(values: Mapping[Taxon, float], taxonomy: Taxonomy) -> dict[str, tuple[float | None, int]]:
    """{bucket: (unweighted mean over species, number of species)} for every bucket, in order.

    A species' bucket is its number of training images in `taxonomy` (`taxonomy.count`); an empty
    bucket gives (None, 0). A missing value is an error naming the species (no silent dropping).
    """
    acc: dict[str, list[float]] = {b: [] for b in BUCKETS}
    for t, v in values.items():
        n = taxonomy.count(t)
        if n < 1:
            raise KeyError(f"{' > '.join(t.path)} has no training images in this taxonomy")
        acc[bucket_of(n)].append(_finite(t, v))
    return {b: ((sum(v) / len(v)) if v else None, len(v)) for b, v in acc.items()}


def per_species(result: Mapping[str, Any], field: str) -> dict[Taxon, float]:
    """One field of a metric result's per-species entries, e.g. per_species(bioclip, "score")."""
    entries = result.get("per_species", result.get("per_taxon"))
    if entries is None:
        raise KeyError(f"result of kind {result.get('kind')!r} has no per-species entries")
    return {t: e[field] for t, e in entries.items() if e.get(field) is not None}


def few_shot_table(results: Mapping[str, tuple[Mapping[str, Any], str]], taxonomy: Taxonomy) -> dict:
    """Few-shot bucket table: rows = buckets, columns = metrics; `results` = {column: (result, field)}.

    Each column is the unweighted mean over the species of the bucket of one per-species field.
    """
    cols = {name: by_bucket(per_species(res, fld), taxonomy) for name, (res, fld) in results.items()}
    rows = [{"bucket": b, **{f"{name} (n species)": cols[name][b][1] for name in cols},
             **{name: cols[name][b][0] for name in cols}} for b in BUCKETS]
    return {"kind": "table", "title": "Few-shot buckets (training images per species)",
            "rows": rows, "provenance": {name: res["provenance"] for name, (res, _) in results.items()},
            "definition": "Species bucketed by training images (1, 2-5, 6-20, >20); each cell is the "
                          "unweighted mean over the bucket's species of the per-species value."}


def table_s2(
    taxonomy: Taxonomy,
    rank: str,
    n_generated: Mapping[Taxon, int],
    fid: Mapping[str, Any] | None = None,
    lpips: Mapping[str, Any] | None = None,
    bioclip: Mapping[str, Any] | None = None,
    lpips_field: str = "lpips",
) -> dict:
    """The paper's Table S2 layout per taxon of `rank`: species, generated images per species, FID,
    LPIPS, BioCLIP. FID is the per-taxon FID of `fid_by_level` at that rank (None when that taxon had
    too few samples); LPIPS and BioCLIP are unweighted means over the group's evaluated species."""
    species = group_by_level({t: n for t, n in n_generated.items()}, taxonomy, rank)
    fid_t = (fid or {}).get("per_taxon", {})
    lp = per_species(lpips, lpips_field) if lpips else {}
    bc = per_species(bioclip, "score") if bioclip else {}
    rows = []
    for group, members in species.items():
        counts = sorted(set(members.values()))
        row = {rank: group.name, "lineage": " > ".join(group.path), "species": len(members),
               "images per species": counts[0] if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"}
        if fid is not None:
            row["FID"] = fid_t.get(group, {}).get("fid")
        for name, vals in (("LPIPS", lp if lpips else None), ("BioCLIP", bc if bioclip else None)):
            if vals is not None:
                got = [vals[t] for t in members if t in vals]
                row[name] = sum(got) / len(got) if got else None
                row[f"{name} species"] = len(got)
        rows.append(row)
    prov = {k: r["provenance"] for k, r in (("FID", fid), ("LPIPS", lpips), ("BioCLIP", bioclip)) if r}
    return {"kind": "table", "title": f"Per-{rank} results (paper Table S2 layout)", "rows": rows,
            "provenance": prov, "definition": f"One row per {rank}: number of evaluated species, "
            f"generated images per species, per-{rank} FID (fid_by_level per taxon), LPIPS "
            f"({lpips_field}) and BioCLIP score averaged over the {rank}'s species."}


# -- writing -----------------------------------------------------------------------------------------
def to_jsonable(obj: Any) -> Any:
    """Taxon keys -> "A > B > C" lineage strings, tensors/arrays -> lists, NaN/inf -> None."""
    if isinstance(obj, Taxon):
        return " > ".join(obj.path)
    if isinstance(obj, Mapping):
        return {to_jsonable(k) if isinstance(k, Taxon) else str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # torch tensors, numpy arrays and scalars
        return to_jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


REQUIRED_PROVENANCE = ("library", "library_version", "weights", "resolution", "settings", "definition")


def _check(name: str, res: Mapping[str, Any]) -> None:
    provs = ([res.get("provenance")] if res.get("kind") != "table"
             else list(res.get("provenance", {}).values()))
    if not provs or any(not p or any(k not in p for k in REQUIRED_PROVENANCE) for p in provs):
        raise ValueError(f"results[{name!r}] lacks a complete provenance block ({REQUIRED_PROVENANCE}); "
                         f"every number must say how it was obtained")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def _md_table(rows: Sequence[Mapping[str, Any]], cols: Sequence[str] | None = None) -> list[str]:
    if not rows:
        return ["(no rows)"]
    cols = list(cols or dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return out


def _md_fid(res: Mapping[str, Any]) -> list[str]:
    cols = ["rank", "n_taxa", "n_gen", "n_real", "fid", "fid_small_n", "kid_mean", "kid_std",
            "kid_subset_size"]
    out = _md_table(list(res["levels"].values()), cols)
    computed = {t: e for t, e in res.get("per_taxon", {}).items() if e.get("fid") is not None}
    if computed:
        out += ["", "Per taxon:", ""]
        out += _md_table([{"taxon": str(t), **e} for t, e in computed.items()], ["taxon", *cols[2:]])
    if res.get("skipped"):
        out += ["", f"Skipped taxa: {len(res['skipped'])} ("
                + "; ".join(f"{s['taxon']}: {s['reason']}" for s in res["skipped"][:20]) + ")"]
    return out


def _md_per_species(res: Mapping[str, Any]) -> list[str]:
    rows = [{k: v for k, v in res.items() if k != "kind" and not isinstance(v, (Mapping, list))}]
    out = _md_table(rows) + ["", "Per-species values: metrics.json."]
    if res.get("skipped"):
        out += ["", f"Skipped species: {len(res['skipped'])} ("
                + "; ".join(f"{s['taxon']}: {s['reason']}" for s in res["skipped"][:20]) + ")"]
    return out


def _md_oracle(res: Mapping[str, Any]) -> list[str]:
    rows = [{"conditioned on": rank, "taxa": e["n_taxa"], "images": e["n_images"],
             **{f"{r} acc": v for r, v in e["accuracy"].items()}, "oracle Frechet": e["frechet"]}
            for rank, e in res["levels"].items()]
    return _md_table(rows) + ["", "Per-species accuracy: metrics.json."]


def _md_judge(res: Mapping[str, Any]) -> list[str]:
    """Generated-image accuracy per rank and FID/KID in the judge's features, under the judge's own
    held-out accuracy on real photos: the ceiling those accuracies are read against."""
    c = res["ceiling"]
    split = c["split"]
    out = [f"Judge ceiling (held-out real photos: {split['held_out_images']} images of "
           f"{split.get('held_out_species', '?')} species; {split['species_single_image']} single-image "
           f"species train only):", ""]
    out += _md_table([{"": name, **{f"{r} acc": v for r, v in (c[key] or {}).items()}}
                      for name, key in (("held-out accuracy", "held_out_accuracy"),
                                        ("majority-label baseline", "held_out_majority_baseline"),
                                        ("training images", "train_accuracy"))])
    rows = [{"conditioned on": rank, "taxa": e["n_taxa"], "images": e["n_images"],
             **{f"{r} acc": v for r, v in e["accuracy"].items()}, "judge FID": e["fid"],
             "FID small n": e["fid_small_n"], "judge KID": e["kid_mean"], "KID std": e["kid_std"]}
            for rank, e in res["levels"].items()]
    return out + ["", "Generated images:", ""] + _md_table(rows) + ["", "Per-species accuracy: metrics.json."]


# kind -> Markdown renderer (a plain dict, house style)
RENDERERS: dict[str, Callable[[Mapping[str, Any]], list[str]]] = {
    "fid_by_level": _md_fid,
    "lpips_fidelity": _md_per_species,
    "lpips_diversity": _md_per_species,
    "bioclip": _md_per_species,
    "oracle": _md_oracle,
    "judge": _md_judge,
    "table": lambda res: _md_table(res["rows"]),
}


def _md_provenance(p: Mapping[str, Any]) -> list[str]:
    weights = "; ".join(f"{k}: {w.get('file', w.get('name', w))} (sha256 {str(w.get('sha256', '?'))[:16]})"
                        if isinstance(w, Mapping) else f"{k}: {w}" for k, w in p["weights"].items())
    settings = ", ".join(f"{k}={v}" for k, v in p["settings"].items())
    return [f"- {p['definition']}", f"  - computed with {p['library']} {p['library_version']} "
            f"(torch {p['torch_version']}, taxadiffusion {p['taxadiffusion_version']}); input "
            f"resolution: {p['resolution']}", f"  - weights: {weights}", f"  - settings: {settings}"]


def write_metrics(out_dir: str | Path, results: Mapping[str, Mapping[str, Any]]) -> tuple[Path, Path]:
    """Write `metrics.json` and `metrics.md` into `out_dir`; returns their paths.

    `results` maps a name to a metric result (fid_by_level, lpips_fidelity, lpips_diversity, bioclip)
    or a table (few_shot_table, table_s2). Each must carry its provenance; tables carry the provenance
    of every metric they summarise, so each number in metrics.json says how it was obtained.
    """
    for name, res in results.items():
        if res.get("kind") not in RENDERERS:
            raise ValueError(f"results[{name!r}] has unknown kind {res.get('kind')!r}; "
                             f"known: {sorted(RENDERERS)}")
        _check(name, res)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "results": to_jsonable(dict(results))}
    js = out / "metrics.json"
    js.write_text(json.dumps(doc, indent=1, ensure_ascii=False, allow_nan=False))

    md = [f"# Metrics", "", f"Written {doc['created']}. Every number in metrics.json carries the "
          f"provenance summarised at the end of this file.", ""]
    for name, res in results.items():
        title = res.get("title", name)
        md += [f"## {title}" + (f" (`{name}`)" if title != name else ""), ""]
        md += RENDERERS[res["kind"]](res) + [""]
    md += ["## How each number was obtained", ""]
    shown: list[tuple[str, Mapping]] = []
    for name, res in results.items():
        provs = (res["provenance"].items() if res["kind"] == "table" else [(None, res["provenance"])])
        for col, p in provs:
            md += [f"### {name}" + (f" / {col}" if col else ""), ""]
            same = next((n for n, q in shown if q == p), None)
            md += ([f"- as `{same}` above", ""] if same else [*_md_provenance(p), ""])
            shown.append((name + (f" / {col}" if col else ""), p))
        if res["kind"] == "table":
            md += [f"- table: {res['definition']}", ""]
    mdp = out / "metrics.md"
    mdp.write_text("\n".join(md))
    return js, mdp
