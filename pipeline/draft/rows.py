"""Row subsets of [B, T, ...] batches: the training-time test runs each draft step only on the rows it needs."""

from __future__ import annotations

import torch


def rows_where(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool -> [B, R] the indices of each batch row's True rows in order, padded with T (past the end)."""
    B, T = mask.shape
    width = max(1, int(mask.sum(1).max()) if B else 1)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]  # True rows first
    return torch.where(mask.gather(1, order), order, T)


def take(x: torch.Tensor, rows: torch.Tensor, shift: int = 0) -> torch.Tensor:
    """x[b, rows[b, r] + shift] -> [B, R, ...]; zero (False) past the end, as ``shift_left`` pads."""
    at = rows + shift
    inside = (at < x.shape[1]).view(*at.shape, *[1] * (x.dim() - 2))
    index = at.clamp(max=x.shape[1] - 1).view(*at.shape, *[1] * (x.dim() - 2)).expand(*at.shape, *x.shape[2:])
    return x.gather(1, index).masked_fill(~inside, 0)
