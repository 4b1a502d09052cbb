"""taxadiffusion: taxonomy-aware diffusion models of species images (TaxaDiffusion, ICCV 2025).

Imports are light here: `import taxadiffusion` does not import torch. Heavy parts live in their
modules (pipeline, training, evaluation) and are imported where used.
"""
from .taxonomy import ALL_RANKS, Taxon, Taxonomy

__version__ = "0.1.0"
__all__ = ["ALL_RANKS", "Taxon", "Taxonomy", "__version__"]
