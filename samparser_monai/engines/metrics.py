# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Slice-level Dice: the 2D score SAM-style papers report, next to the 3D Dice of the pasted-back volume."""

from __future__ import annotations

import torch
from monai.metrics import CumulativeIterationMetric

__all__ = ["SliceDiceMetric"]


class SliceDiceMetric(CumulativeIterationMetric):
    """Mean 2D Dice over the slices (along ``axis``) where the reference holds the label.

    Inputs are one-hot ``B x C x X x Y x Z`` prediction and reference (channel 0 = background, skipped). Each item
    gives one value per label channel: the mean Dice over that label's reference slices (NaN when it has none).
    ``aggregate`` returns the mean over items and labels, ignoring NaN.

    Args:
        axis: spatial axis of the slices (2 = axial after RAS orientation).
    """

    def __init__(self, axis: int = 2) -> None:
        super().__init__()
        self.axis = axis

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None or y_pred.shape != y.shape or y.ndim != 5:
            raise ValueError(
                "SliceDiceMetric needs one-hot prediction and reference of the same B x C x X x Y x Z shape."
            )
        slice_dim = self.axis + 2
        reduce = [d for d in (2, 3, 4) if d != slice_dim]
        pred, ref = y_pred[:, 1:].bool(), y[:, 1:].bool()
        intersection = (pred & ref).sum(dim=reduce).float()  # B x (C-1) x slices
        total = pred.sum(dim=reduce).float() + ref.sum(dim=reduce).float()
        present = ref.sum(dim=reduce) > 0
        dice = torch.where(present, 2 * intersection / total.clamp_min(1), torch.zeros_like(total))
        count = present.sum(dim=-1)
        return torch.where(
            count > 0, dice.sum(dim=-1) / count.clamp_min(1), torch.full_like(count, float("nan"), dtype=dice.dtype)
        )

    def aggregate(self) -> torch.Tensor:
        """Mean over items and labels of the per-label slice Dice (NaN ignored)."""
        values = self.get_buffer()
        return torch.nanmean(values.float()) if values is not None and values.numel() else torch.tensor(float("nan"))
