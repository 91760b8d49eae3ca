"""Weight-space and optimizer-like methods against loss of plasticity, one file per family (DESIGN.md):
``weight-clipping`` (:mod:`.clipping`) and ``upgd`` (:mod:`.upgd`). Importing the package registers them."""

from . import clipping, upgd

__all__ = ["clipping", "upgd"]
