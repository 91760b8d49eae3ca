"""The CSR backend: an unstructured sparse linear layer as torch.sparse CSR, one block per member.

Member s's active weights, in row-major order, are ``values[s]`` (S, nnz); every member of a layer has the
same number of them (the exact-count masks of ``dst.sparsify``, kept exact by SET and RigL). The members'
matrices are the diagonal blocks of one (S x units) x (S x in) CSR matrix, so one sparse product serves all
members. With r(e), c(e) the unit and input of connection e, X the input as (S x in, batch) and D = dL/dh as
(S x units, batch):

    forward         h = CSR(values) X                       (torch.sparse: ``mv`` for a batch of one)
    weight gradient dvalues[e] = sum_b D[r(e), b] X[c(e), b]  (two gathers)
    input gradient  dX[i] = sum over e with c(e) = i of values[e] D[r(e)]   (a scatter-add)
"""

from __future__ import annotations

import warnings

import torch

from ..errors import ConfigError
from .compact import CompactLinear

__all__ = ["CSRLinear"]


class CSRLinear(CompactLinear):
    """An unstructured sparse layer on torch.sparse CSR (see the module docstring)."""

    name = "csr"

    def build(self, mask: torch.Tensor) -> tuple[int, ...]:
        members, units, n_in = mask.shape
        counts = mask.reshape(members, -1).sum(1)
        if bool((counts != counts[0]).any()) or int(counts[0]) == 0:
            raise ConfigError(
                f"the csr backend needs the same number of active weights in every member of a layer, got "
                f"{counts.tolist()}; use backend=masked"
            )
        nnz = int(counts[0])
        self.positions = mask.reshape(members, -1).nonzero()[:, 1].view(members, nnz)  # row-major per member
        offsets = torch.arange(members, device=mask.device)[:, None]
        self.rows = ((self.positions // n_in) + offsets * units).view(-1)
        self.columns = ((self.positions % n_in) + offsets * n_in).view(-1)
        per_row = torch.bincount(self.rows, minlength=members * units)
        self.crow = torch.zeros(members * units + 1, dtype=torch.long, device=mask.device)
        self.crow[1:] = per_row.cumsum(0)
        self.shape = (members * units, members * n_in)
        self.valid = None
        return members, nnz

    def condense(self, optimizer: torch.optim.Optimizer | None) -> None:
        super().condense(optimizer)
        with warnings.catch_warnings():  # torch's note that its CSR support is in beta
            warnings.simplefilter("ignore", UserWarning)
            # its values are a view of ``values``: the optimizer's in-place updates are the matrix's
            self.matrix = torch.sparse_csr_tensor(self.crow, self.columns, self.values.detach().view(-1), self.shape,
                                                  check_invariants=False)

    def forward(self, a: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        members, batch, n_in = a.shape
        if batch == 1:
            x = a.reshape(members * n_in)
            h = torch.mv(self.matrix, x).view(members, 1, -1)
        else:
            x = a.transpose(1, 2).reshape(members * n_in, batch)
            h = (self.matrix @ x).view(members, -1, batch).transpose(1, 2)
        return (h if bias is None else h + bias.unsqueeze(1)), x

    def _per_unit(self, delta: torch.Tensor) -> torch.Tensor:
        members, batch, units = delta.shape
        return delta.reshape(members * units) if batch == 1 else delta.transpose(1, 2).reshape(members * units, batch)

    def weight_grad(self, delta: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
        grad = self._per_unit(delta).index_select(0, self.rows) * saved.index_select(0, self.columns)
        return (grad if grad.dim() == 1 else grad.sum(-1)).view(self.values.shape)

    def input_grad(self, delta: torch.Tensor) -> torch.Tensor:
        members, batch, _ = delta.shape
        per_unit = self._per_unit(delta).index_select(0, self.rows)
        values = self.values.detach().reshape(-1)
        if batch == 1:
            out = torch.zeros(members * self.n_in, dtype=delta.dtype, device=delta.device)
            return out.scatter_add_(0, self.columns, values * per_unit).view(members, 1, self.n_in)
        out = torch.zeros(members * self.n_in, batch, dtype=delta.dtype, device=delta.device)
        out.index_add_(0, self.columns, values[:, None] * per_unit)
        return out.view(members, self.n_in, batch).transpose(1, 2)
