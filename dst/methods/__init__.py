"""Weight-space and optimizer-like methods against loss of plasticity, one file per family (DESIGN.md):
``weight-clipping`` (:mod:`.clipping`), ``upgd`` (:mod:`.upgd`), ``parseval`` and ``spectral-reg``
(:mod:`.regularisers`), ``hare-tortoise`` (:mod:`.hare_tortoise`),
``plasticity-injection`` (:mod:`.injection`). Importing the package registers them."""

from . import clipping, hare_tortoise, injection, regularisers, upgd

__all__ = ["clipping", "hare_tortoise", "injection", "regularisers", "upgd"]
