"""Weight-space and optimizer-like methods against loss of plasticity, one file per family (DESIGN.md):
``weight-clipping`` (:mod:`.clipping`), ``upgd`` (:mod:`.upgd`), ``parseval`` and ``spectral-reg``
(:mod:`.regularisers`). Importing the package registers them."""

from . import clipping, regularisers, upgd

__all__ = ["clipping", "regularisers", "upgd"]
