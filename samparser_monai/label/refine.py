# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""What a request asks of the result beyond the box prompts: stay inside the ROI, and drop what background clicks
mark. Works on the written label map, in the stored image's voxel indices (where the clicks were given)."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
from scipy import ndimage

from samparser_monai.label.requests import PromptPlan

__all__ = ["refine_file", "refine_mask"]


def refine_mask(mask: np.ndarray, plan: PromptPlan) -> np.ndarray:
    """``mask`` (stored voxel order) clipped to ``plan.keep``, without the connected pieces that background clicks
    land on (26-connectivity). Returns a new array."""
    out = np.asarray(mask).copy()
    if plan.keep is not None:
        inside = np.zeros(out.shape, dtype=bool)
        inside[tuple(slice(lo, hi + 1) for lo, hi in plan.keep)] = True
        out[~inside] = 0
    if plan.background:
        pieces, _ = ndimage.label(out > 0, structure=np.ones((3, 3, 3), dtype=bool))
        hit = {int(pieces[p]) for p in plan.background} - {0}
        out[np.isin(pieces, list(hit))] = 0
    return out


def refine_file(path: str | os.PathLike, plan: PromptPlan) -> int:
    """Apply :func:`refine_mask` to a NIfTI label map in place (header kept); returns its foreground voxel count."""
    image = nib.load(os.fspath(path))
    mask = np.asarray(image.dataobj)
    refined = refine_mask(mask, plan)
    if plan.keep is not None or plan.background:
        nib.save(nib.Nifti1Image(refined.astype(mask.dtype), image.affine, image.header), os.fspath(path))
    return int((refined > 0).sum())
