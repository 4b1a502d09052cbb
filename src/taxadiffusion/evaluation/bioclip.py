"""BioCLIP score and BioCLIP zero-shot species accuracy, through open_clip (paper Sec. 4.2).

Model: open_clip `hf-hub:imageomics/bioclip` (ViT-B/16, 224 px, OpenAI mean/std), read from the local
Hugging Face cache only (never downloaded), or from a directory holding `open_clip_config.json` and one
of open_clip's weight files (`open_clip_model.safetensors`, `open_clip_pytorch_model.bin`, ...). The
architecture comes from the config (open_clip `local-dir:`), the weights are loaded strictly with
`open_clip.load_checkpoint(weights_only=True)`: open_clip's own hub path would fall back to random
weights with only a log warning when the file is absent, which we refuse.

Score (our definition: the paper's exact one is unpublished, REFERENCE-FACTS.md): for an image of
species s, 100 x max(cos(image embedding, text embedding), 0), the text being
`taxonomy.bioclip_text(s)` = "a photo of Animalia Chordata ... Chaetodon auriga." (epithet lower case,
BioCLIP's taxonomic template) - the CLIPScore form (Hessel et al. 2021, w = 100), averaged per species.
Zero-shot top-1: the image is assigned the species whose text embedding is closest (cosine) among the
texts of all evaluated species (or given candidates). Text embeddings are computed once per text.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import open_clip
import torch
from torchvision.transforms.functional import to_pil_image

from ..taxonomy import Taxon, Taxonomy
from .weights import MissingWeightsError, file_identity, provenance

BIOCLIP = "hf-hub:imageomics/bioclip"
CONFIG_FILE = "open_clip_config.json"
# open_clip's preferred order when it picks a checkpoint in a directory (factory._find_checkpoint_in_dir)
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")


@dataclass
class Bioclip:
    """A loaded open_clip model with its eval transform, tokenizer, identity and text-embedding cache."""

    model: torch.nn.Module
    preprocess: Callable            # PIL image -> normalised tensor (open_clip's eval transform)
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    identity: dict[str, Any]
    device: torch.device = torch.device("cpu")
    text_cache: dict[str, torch.Tensor] = field(default_factory=dict)


def _hf_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def bioclip_files(source: str | os.PathLike = BIOCLIP, cache_dir: str | os.PathLike | None = None
                  ) -> tuple[Path, Path]:
    """(config, weights) of a BioCLIP source: "hf-hub:<repo>" (local HF cache only), a directory, or
    "local-dir:<directory>". MissingWeightsError names the files, where they were looked for and how
    to get them."""
    source = str(source)
    files = f"{CONFIG_FILE} and one of {', '.join(WEIGHT_FILES)}"
    if source.startswith("hf-hub:"):
        from huggingface_hub import try_to_load_from_cache

        repo = source[len("hf-hub:"):]
        cache = Path(cache_dir) if cache_dir else _hf_cache()
        found = [try_to_load_from_cache(repo, f, cache_dir=cache) for f in (CONFIG_FILE, *WEIGHT_FILES)]
        found = [Path(f) if isinstance(f, str) else None for f in found]
        weights = next((f for f in found[1:] if f is not None), None)
        if found[0] is not None and weights is not None:
            return found[0], weights
        where = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / "<revision of refs/main>"
        raise MissingWeightsError(
            f"BioCLIP files for {source} not found ({files}). Nothing is downloaded at run time.\n"
            f"Looked in:\n  - {where}  (Hugging Face hub cache: HF_HUB_CACHE, default "
            f"~/.cache/huggingface/hub)\nHow to get them: on a machine with internet run "
            f"`huggingface-cli download {repo}` (or `hf download {repo}`) and copy its "
            f"{cache.name}/models--{repo.replace('/', '--')} folder into {cache}; or put "
            f"{CONFIG_FILE} and the weights file in a directory and pass it: `--bioclip /path/to/dir` "
            f"(taxadiffusion evaluate; in Python: load_bioclip(source=...)).")
    d = Path(source[len("local-dir:"):] if source.startswith("local-dir:") else source)
    weights = next((d / f for f in WEIGHT_FILES if (d / f).is_file()), None)
    if (d / CONFIG_FILE).is_file() and weights is not None:
        return d / CONFIG_FILE, weights
    raise MissingWeightsError(
        f"BioCLIP files not found in {d} ({files}). Nothing is downloaded at run time.\n"
        f"Looked in:\n  - {d / CONFIG_FILE}\n" + "".join(f"  - {d / f}\n" for f in WEIGHT_FILES)
        + f"How to get them: on a machine with internet run `huggingface-cli download imageomics/bioclip "
          f"--local-dir {d}` and copy that directory here, or pass `--bioclip {BIOCLIP}` (taxadiffusion "
          f"evaluate; in Python: load_bioclip(source=...)) to use the local HF cache.")


_LOADED: dict[tuple, Bioclip] = {}


class _DropNotice(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def load_bioclip(source: str | os.PathLike = BIOCLIP, *, cache_dir: str | os.PathLike | None = None,
                 device: str | torch.device | None = None) -> Bioclip:
    """Build BioCLIP (or any open_clip model in the same layout) from local files (memoised)."""
    config, weights = bioclip_files(source, cache_dir)
    ident = {"source": str(source), "config": file_identity(config), "weights": file_identity(weights)}
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    key = (ident["weights"]["path"], ident["weights"]["sha256"], str(dev))
    if key not in _LOADED:
        local = f"local-dir:{config.parent}"
        # open_clip logs "initialized randomly" for load_weights=False; the weights follow right below
        quiet = _DropNotice("initialized randomly")
        logging.getLogger().addFilter(quiet)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(local, load_weights=False)
        finally:
            logging.getLogger().removeFilter(quiet)
        try:
            open_clip.load_checkpoint(model, str(weights), strict=True, weights_only=True)
        except Exception as e:
            raise ValueError(f"{weights}: does not fit the architecture in {config}: {e}") from e
        _LOADED[key] = Bioclip(model.eval().to(dev), preprocess, open_clip.get_tokenizer(local), ident, dev)
    return _LOADED[key]


def image_embeddings(bio: Bioclip, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """L2-normalised image embeddings (N, D) of uint8 images (N, 3, H, W).

    Each image goes through open_clip's own eval transform on a PIL image (resize shortest side,
    bicubic; centre crop; OpenAI mean/std), exactly what BioCLIP sees for a PNG read from disk."""
    if not (torch.is_tensor(images) and images.dtype == torch.uint8 and images.dim() == 4
            and images.shape[1] == 3):
        got = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"BioCLIP images: expected a uint8 tensor (N, 3, H, W), got {got}")
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = torch.stack([bio.preprocess(to_pil_image(im)) for im in images[i:i + batch_size]])
            out.append(bio.model.encode_image(x.to(bio.device), normalize=True).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def text_embeddings(bio: Bioclip, texts: Sequence[str]) -> torch.Tensor:
    """L2-normalised text embeddings (T, D); each distinct text is encoded once per loaded model."""
    new = [t for t in dict.fromkeys(texts) if t not in bio.text_cache]
    if new:
        with torch.inference_mode():
            emb = bio.model.encode_text(bio.tokenizer(new).to(bio.device), normalize=True).float().cpu()
        bio.text_cache.update(zip(new, emb))
    return torch.stack([bio.text_cache[t] for t in texts])


def bioclip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """100 x max(cos, 0) per row, for normalised embeddings of matching rows (N, D) x (N or 1, D)."""
    return 100.0 * (image_emb * text_emb).sum(-1).clamp(min=0)


def bioclip_eval(
    bio: Bioclip,
    images: Mapping[Taxon, torch.Tensor],
    taxonomy: Taxonomy,
    *,
    candidates: Sequence[Taxon] | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """BioCLIP score and zero-shot top-1 per species and overall, with provenance.

    `images`: {species: uint8 images}. `candidates`: the species zero-shot chooses among (default: every
    species in `images`, the "evaluated species"). Species with no images are skipped and listed.
    """
    from .stream import count   # images may be read from disk per species (stream.TaxonImages)
    skipped = [{"taxon": t, "reason": "no images"} for t in sorted(images) if count(images, t) == 0]
    species = [t for t in sorted(images) if count(images, t)]
    cands = sorted(candidates) if candidates is not None else species
    missing = [t for t in species if t not in set(cands)]
    if missing:
        raise ValueError(f"zero-shot candidates lack evaluated species: {[str(t) for t in missing[:5]]}")
    texts = {t: taxonomy.bioclip_text(t) for t in cands}
    cand_emb = text_embeddings(bio, [texts[t] for t in cands])
    index = {t: i for i, t in enumerate(cands)}
    per: dict[Taxon, dict] = {}
    all_scores, all_hits = [], []
    for t in species:
        emb = image_embeddings(bio, images[t], batch_size)
        own = cand_emb[index[t]]
        scores = bioclip_score(emb, own[None])
        hits = (emb @ cand_emb.T).argmax(1) == index[t]
        all_scores.append(scores)
        all_hits.append(hits)
        per[t] = {"score": float(scores.mean()), "score_std": float(scores.std()) if len(scores) > 1 else 0.0,
                  "top1": float(hits.float().mean()), "n": len(scores), "text": texts[t]}
    n = sum(len(s) for s in all_scores)
    mean = (lambda xs: sum(xs) / len(xs) if xs else None)
    settings = {"template": "taxonomy.bioclip_text: 'a photo of <kingdom> ... <genus> <epithet>.'",
                "zero_shot_candidates": len(cands), "batch_size": batch_size,
                "preprocess": "open_clip eval transform on PIL images"}
    definition = (
        "BioCLIP score = 100 x max(cosine, 0) between the BioCLIP image embedding and the embedding "
        "of the species' taxonomic text 'a photo of Kingdom Phylum Class Order Family Genus epithet.' "
        "(epithet lower case), averaged over the species' images; score_mean_over_species averages "
        "species equally. The paper does not publish its exact definition; this is ours "
        "(CLIPScore form, w=100). Zero-shot top-1: fraction of images whose closest text among all "
        "evaluated species' texts is their own species'.")
    size = getattr(bio.model.visual, "image_size", None)
    return {"kind": "bioclip",
            "score_mean_over_species": mean([e["score"] for e in per.values()]),
            "score_mean_over_images": float(torch.cat(all_scores).mean()) if n else None,
            "top1_over_images": float(torch.cat(all_hits).float().mean()) if n else None,
            "top1_mean_over_species": mean([e["top1"] for e in per.values()]),
            "n_species": len(per), "n_images": n, "n_candidates": len(cands), "n_skipped": len(skipped),
            "per_species": per, "skipped": skipped,
            "provenance": provenance("bioclip", "open_clip_torch", bio.identity, settings,
                                     f"{tuple(size) if size is not None else '?'} (open_clip eval "
                                     f"transform)", definition)}
