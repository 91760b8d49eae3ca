"""Each row's best k scores, ties to the lower position: the selection every connection-level refresh uses.

A population ranks each member's candidates in its own row, so a row's picks must not depend on the other
rows: :func:`ranked` breaks ties by position, and returns each row's picks in its first entries. Three
ways to the same answer, chosen by shape: a selection threshold (``kthvalue``) over the whole row; for rows
of more than 2^18 scores, a threshold read off a strided sample first narrows the candidates; for many rows
of float32 scores (a layer's units), scores and positions packed into int64 keys for one top-k.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["ranked", "picked"]

_PREFILTER_ABOVE = 1 << 18  # ranking more scores than this per row first narrows the candidates
_KEYED_FROM_ROWS = 64  # many rows (units of a layer) are ranked by packed integer keys


def ranked(scores: torch.Tensor, counts: np.ndarray, *, largest: bool) -> torch.Tensor:
    """The positions of each row's best scores: (rows, n) -> (rows, max count), row m's counts[m] best in
    its first counts[m] entries (the rest of the row is filler).

    Best is highest (``largest``) or lowest, ties going to the lower position, so a row's c best are the
    same whatever the other rows ask for: a member's picks do not depend on the other members. The
    threshold comes from a selection (``kthvalue``); only when the counts differ are the picks sorted.
    Over more than 2^18 scores, where a row holds at least 8 k, each row is first narrowed to the about
    2.5 k candidates beyond a threshold read off a strided sample of it, all rows at once; exact for every
    row that keeps at least k (checked; the others are ranked in full).
    """
    k = int(counts.max())
    ordered = bool((counts != k).any())
    rows, n = scores.shape
    if rows >= _KEYED_FROM_ROWS and scores.dtype in (torch.float32, torch.float16, torch.bfloat16) and n < 2**31:
        return _keyed_best(scores, k, ordered, largest)
    keys = -scores if largest else scores
    sample = max(_PREFILTER_ABOVE // 4 // rows, 8 * k)  # sampled scores per row
    stride = n // sample if rows * n > _PREFILTER_ABOVE and 8 * k <= n else 1
    if stride < 2:
        return _lowest(keys, k, ordered)
    strided = keys[:, ::stride]
    position = min(strided.shape[1], max(1, math.ceil(2.5 * k * strided.shape[1] / n)))
    threshold = strided.kthvalue(position, dim=1, keepdim=True).values
    row, column = (keys <= threshold).nonzero(as_tuple=True)
    passing = torch.bincount(row, minlength=rows)
    short = passing < k
    if bool(short.any()):  # rare: ranked in full
        picks = torch.empty(rows, k, dtype=torch.long, device=keys.device)
        picks[short] = _lowest(keys[short], k, ordered)
        fine = ~short
        if not bool(fine.any()):
            return picks
        keep = fine[row]
        row, column = row[keep], column[keep]
        passing = torch.where(fine, passing, 0)
    else:
        picks, fine = None, None
    slot = torch.arange(row.numel(), device=keys.device) - (passing.cumsum(0) - passing)[row]
    width = int(passing.max())
    positions = torch.zeros(rows, width, dtype=torch.long, device=keys.device)
    positions[row, slot] = column
    narrowed = torch.full((rows, width), torch.inf, dtype=keys.dtype, device=keys.device)
    narrowed[row, slot] = keys[row, column]  # padding (+inf) comes after every candidate
    if picks is None:
        return positions.gather(1, _lowest(narrowed, k, ordered))
    picks[fine] = positions[fine].gather(1, _lowest(narrowed[fine], k, ordered))
    return picks


def _keyed_best(scores: torch.Tensor, k: int, ordered: bool, largest: bool) -> torch.Tensor:
    """What ``_lowest`` gives, for many rows of float32 (or narrower) scores: each score and its position
    packed into one int64 (the float's bits made order-preserving, inverted for ``largest``, then the
    position), so that a plain top-k is exact, ties to the lower position, whatever the number of ties
    (rows of equal gradients are common)."""
    bits = (scores.to(torch.float32) + 0.0).view(torch.int32)  # a copy, in which -0.0 + 0.0 = 0.0 ties with 0.0
    bits ^= (bits >> 31) & 0x7FFFFFFF  # a larger float is now a larger integer
    if largest:
        bits.bitwise_not_()  # the largest score first
    packed = bits.to(torch.int64)
    packed <<= 32
    packed |= torch.arange(scores.shape[1], device=scores.device)
    picks = packed.topk(k, dim=1, largest=False, sorted=ordered).indices
    return picks if ordered else picks.sort(dim=1).values


def _lowest(keys: torch.Tensor, k: int, ordered: bool) -> torch.Tensor:
    """Each row's k lowest keys, ties to the lower position: in position order, or lowest first."""
    rows = keys.shape[0]
    threshold = keys.kthvalue(k, dim=1, keepdim=True).values
    take = keys <= threshold
    column = take.nonzero(as_tuple=True)[1]
    if column.numel() > rows * k:  # ties at a row's threshold: only the first ones are taken
        below = keys < threshold
        ties = take & ~below
        take = below | (ties & (ties.cumsum(1) <= k - below.sum(1, keepdim=True)))
        column = take.nonzero(as_tuple=True)[1]
    positions = column.view(rows, k)
    if not ordered:
        return positions
    return positions.gather(1, keys.gather(1, positions).sort(dim=1, stable=True).indices)


def picked(counts: np.ndarray, device: torch.device) -> torch.Tensor:
    """Which entries of :func:`ranked`'s (rows, max count) answer are picks: entry j of row r is one of its
    counts[r] (the rest is filler)."""
    return torch.arange(int(counts.max()), device=device) < torch.as_tensor(counts, device=device)[:, None]
