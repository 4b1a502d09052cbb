"""`taxadiffusion evaluate`: generate (or reuse) images per taxon, measure them, write the tables.

    taxadiffusion evaluate runs/fish --n-per-taxon 50 --levels family genus species --guidance taxa
    accelerate launch -m taxadiffusion.cli evaluate runs/fish ...        (one process per GPU)
    torchrun --nproc_per_node 2 -m taxadiffusion.cli evaluate runs/fish ...    (CPU: gloo)

0. Every metric's network is loaded first (`metric_networks`): a missing Inception, AlexNet or
   BioCLIP file fails in seconds, naming the file, where it was looked for and the option to pass.
1. The model (`sampling.load_for_sampling`) and the real images: by default the run's own training
   data (its config's data section), or another split given with --real/--real-format/--real-root;
   real records whose lineage the model does not know are counted and left out. Real images are
   indexed (paths, checked decodable once) and read per taxon when a metric needs them (stream.py).
2. For every evaluated level, every taxon of that level with real images (or a seeded subset of
   --max-taxa) gets n images, seeded per (taxon, image), written as PNGs under OUT/samples/ as they
   are made (samples.py): the units of work are split over the processes by global rank, so the
   images do not depend on how many there are; a rerun reuses every PNG that decodes (a killed
   evaluation resumes), regenerates missing or damaged ones, and OUT/generation.json counts both.
   OUT/settings.json must match the settings asked for, or it is an error.
3. After a barrier the main process alone computes the metrics, each through its library
   (evaluation/fid.py, lpips.py, bioclip.py, oracle.py, judge.py) with its provenance, reading the
   images back per taxon (never all at once); tables: per level, per class (paper Table S2 layout),
   few-shot buckets.
4. OUT/metrics.json and OUT/metrics.md (tables.write_metrics), and a report section in the run
   (report_section.add_eval_section: the tables, a sample grid per level, the settings).
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Sequence

import torch

from ..config import from_dict
from ..taxonomy import NONE_NAME, Taxon, Taxonomy
from .samples import generate, sample_dir  # noqa: F401  (sample_dir: where callers find the PNGs)
from .stream import GeneratedImages, RealImages, count, real_index
from .tables import few_shot_table, table_s2, write_metrics

METRICS = ("fid", "lpips", "bioclip", "oracle", "judge")


def _run_config(run: Path):
    from ..checkpoint import resolve_checkpoint
    try:
        return from_dict(json.loads((resolve_checkpoint(run) / "config.json").read_text()))
    except FileNotFoundError:
        return None


def data_world(root: str | Path | None):
    """The synthetic world (WorldConfig) whose dataset folder is `root`, else None: the oracle exists
    for it alone."""
    from ..datasets.synthetic import WorldConfig
    if root is None or not (Path(root) / "world.json").exists():
        return None
    return WorldConfig.load(root)


def run_world(run: str | Path):
    """The synthetic world a run (or checkpoint) was trained on, else None."""
    cfg = _run_config(Path(run))
    return data_world(cfg.data.root) if cfg is not None else None


def _taxa_for_level(taxonomy: Taxonomy, level: int, real, max_taxa: int | None, seed: int,
                    only: Sequence[Taxon] | None = None):
    have = {s.path[: level + 1] for s in real}
    allowed = None if only is None else {t.path[: level + 1] for t in only}
    taxa = [t for t in taxonomy.vocab(level) if t.path in have and t.name != NONE_NAME
            and (allowed is None or t.path in allowed)]
    if max_taxa is not None and len(taxa) > max_taxa:
        taxa = sorted(random.Random(seed).sample(taxa, max_taxa))
    return taxa


class Processes:
    """This process among the launched ones (accelerate's PartialState): rank, world, device, barrier.
    Several processes without a GPU need gloo, which accelerate builds only when told cpu=True (as
    training.py does)."""

    def __init__(self, device: str | None):
        from accelerate import PartialState
        multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.state = PartialState(cpu=multi_cpu)
        self.rank, self.world = self.state.process_index, self.state.num_processes
        self.main = self.state.is_main_process
        # one GPU per process: a bare "cuda" (or nothing) means this process' own
        self.device = (str(self.state.device) if self.world > 1 and device in (None, "cuda") else device)

    def barrier(self) -> None:
        self.state.wait_for_everyone()

    def gather(self, items: list) -> list:
        from accelerate.utils import gather_object
        return gather_object(items) if self.world > 1 else items


def _sources(run: Path, cfg, real, real_format, real_root):
    data = cfg.data if cfg is not None else None
    if real is None and data is None:
        raise ValueError(f"{run} is a saved pipeline without a run config: pass --real, --real-format "
                         f"and --real-root")
    fmt = real_format or (data.format if data else None)
    if fmt is None:
        raise ValueError(f"{run} is a saved pipeline without a run config: pass --real-format with --real")
    return data, fmt, real if real is not None else data.metadata, real_root or (data.root if data else None)


def _settings_file(out: Path, settings: dict, main: bool) -> None:
    """Every process checks OUT/settings.json (so every one stops on a mismatch); the main one writes
    it, atomically, so another never reads half a file."""
    sfile = out / "settings.json"
    if sfile.exists() and json.loads(sfile.read_text()) != settings:
        raise ValueError(f"{out} holds samples made with other settings ({sfile}); use another --out")
    if main:
        tmp = out / ".settings.json.tmp"
        tmp.write_text(json.dumps(settings, indent=1))
        os.replace(tmp, sfile)


def _generation_report(out: Path, stats: list[dict], world: int) -> dict:
    total = {k: sum(s[k] for s in stats) for k in ("images", "reused", "generated", "damaged")}
    doc = {**total, "processes": world, "per_process": stats}
    (out / "generation.json").write_text(json.dumps(doc, indent=1))
    print(f"samples: {total['reused']} reused, {total['generated']} generated ({total['damaged']} "
          f"damaged PNGs regenerated) of {total['images']}, on {world} process(es)")
    return doc


def _fid(inc, gen: GeneratedImages, real: RealImages, lvls, dataset_id: str, split: str, resolution: int,
         seed: int, device, out: Path) -> dict:
    """FID/KID per level on Inception features: real ones from the per-image cache (read per batch),
    generated ones per taxon (stream.generated_features); images never pooled."""
    from ..backbone import cache_root
    from .fid import fid_by_level, file_ids, reference_features
    from .stream import generated_features
    paths = [p for t in real for p in real.paths(t)]
    ids = file_ids(paths)  # keyed by (path, size, mtime): a changed image is read again
    path_of = dict(zip(ids, paths))
    feats = reference_features(ids, lambda b: real.read_paths([path_of[i] for i in b]),
                               cache_dir=cache_root() / "fid-reference",
                               dataset_id=dataset_id, split=split, resolution=resolution, weights=inc,
                               device=device)
    real_feats, k = {}, 0
    for t in real:
        real_feats[t] = feats[k:k + real.n_images(t)]
        k += real.n_images(t)
    res = fid_by_level(generated_features(gen, inc, out / "features"), real_feats, lvls, weights=inc,
                       seed=seed, device=device, feature_source=inc.identity)
    sizes = [f"{resolution}x{resolution}"]   # features passed in carry no size: the images had this one
    res["provenance"]["settings"].update(generated_image_sizes=sizes, real_image_sizes=sizes)
    return res


def _metrics(metrics, nets, gen, real, tax, settings, lvls, seed, device, fid_args) -> dict:
    species_gen = gen.restrict(t for t in gen if t.level == tax.num_levels - 1)
    results: dict[str, dict] = {}
    if "oracle" in metrics:
        from .oracle import oracle_result
        results["oracle"] = oracle_result(nets["oracle"], gen, real, tax, settings)
    if "judge" in metrics:
        from .judge_score import judge_result
        results["judge"] = judge_result(nets["judge"], gen, real, tax, settings, seed=seed)
    if "fid" in metrics:
        results["fid"] = _fid(nets["fid"], gen, real, lvls, seed=seed, device=device, **fid_args)
    if "lpips" in metrics:
        from .lpips import lpips_diversity, lpips_fidelity
        results["lpips_fidelity"] = lpips_fidelity(nets["lpips"], species_gen, real, seed=seed)
        results["lpips_diversity"] = lpips_diversity(nets["lpips"], species_gen, seed=seed)
    if "bioclip" in metrics:
        from .bioclip import bioclip_eval
        results["bioclip"] = bioclip_eval(nets["bioclip"], species_gen, tax)
        results["bioclip_real"] = bioclip_eval(nets["bioclip"], real.restrict(species_gen), tax)
    return _tables(results, tax, species_gen)


def _tables(results: dict, tax: Taxonomy, species_gen) -> dict:
    cols = {}
    if "bioclip" in results:
        cols["BioCLIP"] = (results["bioclip"], "score")
    if "lpips_fidelity" in results:
        cols["LPIPS"] = (results["lpips_fidelity"], "lpips")
    if "oracle" in results and results["oracle"]["per_species"]:
        cols["oracle species acc"] = (results["oracle"], "species_acc")
    if "judge" in results and results["judge"]["per_species"]:
        cols["judge species acc"] = (results["judge"], "species_acc")
    if cols and species_gen:
        results["few_shot"] = few_shot_table(cols, tax)
    group_rank = next((r for l, r in enumerate(tax.ranks) if tax.size(l) > 1), tax.ranks[0])
    if species_gen and any(k in results for k in ("fid", "lpips_fidelity", "bioclip")):
        results["per_class"] = table_s2(tax, group_rank, {t: count(species_gen, t) for t in species_gen},
                                        fid=results.get("fid"), lpips=results.get("lpips_fidelity"),
                                        bioclip=results.get("bioclip"))
    return results


def evaluate(run: str | Path, *, real: str | None = None, real_format: str | None = None,
             real_root: str | None = None, split: str = "train", n_per_taxon: int | None = None,
             levels: Sequence[str] | None = None, max_taxa: int | None = None,
             species: Sequence[str] | None = None,
             metrics: Sequence[str] | None = None, guidance: str | None = None,
             scale: float | None = None, steps: int | None = None, scheduler: str | None = None,
             seed: int = 0, fid_weights=None, alexnet_weights=None, bioclip: str | None = None,
             out: str | Path | None = None, device: str | None = None, pretrained: str | None = None,
             pretrained_option: str | None = None) -> dict:
    """See the module docstring. `pretrained`/`pretrained_option`: sampling.load_for_sampling's.
    Returns the results on the main process, {} on the others."""
    from ..sampling import load_for_sampling
    run = Path(run)
    cfg = _run_config(run)
    data, fmt, metadata, root = _sources(run, cfg, real, real_format, real_root)
    world = data_world(root)
    metrics = list(metrics or (["oracle"] if world is not None else ["fid", "lpips", "bioclip"]))
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"unknown metric(s) {bad}; known: {METRICS}")
    if "oracle" in metrics and world is None:
        raise ValueError("the oracle exists for the synthetic world only (no world.json beside "
                         f"the data in {root})")
    procs = Processes(device)
    device = procs.device
    nets = metric_networks(metrics, fid_weights, alexnet_weights, bioclip, device)

    pipe, sc = load_for_sampling(run, scheduler, device, pretrained=pretrained,
                                 pretrained_option=pretrained_option)
    pipe.set_progress_bar_config(disable=True)
    tax = pipe.taxonomy
    scale_f = 2 ** (len(pipe.vae.config.block_out_channels) - 1) if pipe.vae is not None else 1
    resolution = pipe.unet.config.sample_size * scale_f
    n = n_per_taxon or (cfg.eval.n_per_taxon if cfg else 50)
    settings = {"guidance": guidance or sc.guidance, "guidance_scale": sc.scale if scale is None else scale,
                "guide_level": sc.guide_level, "num_inference_steps": steps or sc.steps,
                "scheduler": type(pipe.scheduler).__name__, "batch_size": sc.batch_size, "seed": seed,
                "n_per_taxon": n}
    tag = f"{settings['guidance']}-s{settings['guidance_scale']:g}-{settings['num_inference_steps']}" \
          f"{settings['scheduler'].replace('Scheduler', '').lower()}-n{n}-seed{seed}"
    out = Path(out) if out else run / "eval" / tag
    out.mkdir(parents=True, exist_ok=True)
    _settings_file(out, settings, procs.main)

    # -- real images (indexed), the trained judges, taxa, generated images -----------------------------
    real_by, counts, real_table = real_index(tax, fmt, metadata, root, resolution,
                                             data.missing_ranks if data else "fill",
                                             max_per_species=max(n, 50), seed=seed, rank=procs.rank,
                                             world=procs.world, gather=procs.gather)
    if not real_by:
        raise ValueError(f"no real image of {fmt} {metadata} matches the model's taxonomy ({counts})")
    if "oracle" in metrics and procs.main:   # trained (or read from its cache) before sampling
        from .oracle import load_or_train_oracle
        nets["oracle"] = load_or_train_oracle(world)
    if "judge" in metrics and procs.main:   # trained on the real table's photos (cached): judge.py
        from .judge import load_or_train_judge
        nets["judge"] = load_or_train_judge(real_table, tax, resolution)
    lvls = [tax.level_of(l) if not str(l).isdigit() else int(l) for l in (levels or tax.ranks)]
    only = [tax.lookup(s) for s in species] if species else None
    taxa = [t for lvl in lvls for t in _taxa_for_level(tax, lvl, real_by, max_taxa, seed, only)]
    gen = generate(pipe, taxa, n, out / "samples", settings, rank=procs.rank, world=procs.world,
                   size=resolution, progress=procs.main)
    stats = procs.gather([{"rank": procs.rank, **gen.stats}])   # a collective: it waits for all
    procs.barrier()
    if not procs.main:
        return {}
    del pipe
    gen.stats = _generation_report(out, stats, procs.world)

    # -- metrics and tables (main process only, images read back per taxon) ------------------------------
    results = _metrics(metrics, nets, gen, real_by, tax, settings, lvls, seed, device, dict(
        dataset_id=f"{fmt}:{metadata or root}", split=split, resolution=resolution, out=out))
    js, md = write_metrics(out, results)
    (out / "real_images.json").write_text(json.dumps(counts, indent=1))
    print(f"real images: {counts}")
    print(f"wrote {js} and {md}")
    from ..checkpoint import resolve_checkpoint
    from .report_section import add_eval_section
    model = run if cfg is None else resolve_checkpoint(run)
    page = add_eval_section(run, out, results, gen, tax, {
        "model": str(model), "metrics": metrics, "levels": [tax.ranks[l] for l in lvls],
        "real images": {"format": fmt, "metadata": metadata, "root": root, **counts}, **settings})
    if page is not None:
        print(f"wrote {page}")
    return results


def metric_networks(metrics: Sequence[str], fid_weights=None, alexnet_weights=None,
                    bioclip: str | None = None, device: str | None = None) -> dict:
    """{metric: its loaded network} for fid, lpips and bioclip, loaded before any image is generated:
    a missing or wrong weights file costs seconds, not the hours of sampling before it. Every missing
    file is reported at once (one MissingWeightsError naming each file, where it was looked for and
    the option that gives it), so one rerun fixes them all."""
    from .weights import MissingWeightsError
    loaders = {}
    if "fid" in metrics:
        from .fid import load_inception
        loaders["fid"] = lambda: load_inception(fid_weights, device=device)
    if "lpips" in metrics:
        from .lpips import load_lpips
        loaders["lpips"] = lambda: load_lpips(alexnet_weights, device=device)
    if "bioclip" in metrics:
        from .bioclip import BIOCLIP, load_bioclip
        loaders["bioclip"] = lambda: load_bioclip(bioclip or BIOCLIP, device=device)
    nets, missing = {}, []
    for m, load in loaders.items():
        try:
            nets[m] = load()
        except MissingWeightsError as e:
            missing.append(str(e))
    if len(missing) == 1:
        raise MissingWeightsError(missing[0])
    if missing:
        raise MissingWeightsError(f"{len(missing)} metrics lack their weights (nothing was generated):"
                                  "\n\n" + "\n\n".join(missing))
    return nets



def evaluate_command(a) -> dict:
    return evaluate(a.run, real=a.real, real_format=a.real_format, real_root=a.real_root,
                    split=a.split, n_per_taxon=a.n_per_taxon, levels=a.levels, max_taxa=a.max_taxa,
                    species=a.species,
                    metrics=a.metrics.split(",") if a.metrics else None, guidance=a.guidance,
                    scale=a.scale, steps=a.steps, scheduler=a.scheduler, seed=a.seed,
                    fid_weights=a.fid_weights, alexnet_weights=a.alexnet_weights, bioclip=a.bioclip,
                    out=a.out, device=a.device, pretrained=a.pretrained, pretrained_option="--pretrained")
