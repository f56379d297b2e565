# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Input checks that turn a bad volume pair into one sentence naming both files."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

__all__ = ["NONFINITE_KEY", "CheckVolumePaird", "ReplaceNonFinited", "source_name"]

logger = logging.getLogger(__name__)

#: meta-data key where :class:`ReplaceNonFinited` records how many voxels it replaced
NONFINITE_KEY = "nonfinite_voxels"


def source_name(img: object, fallback: str) -> str:
    """The file a loaded image came from (``filename_or_obj`` of its meta data), or ``fallback``."""
    if isinstance(img, MetaTensor):
        name = img.meta.get("filename_or_obj")
        if name:
            return str(name)
    return fallback


class CheckVolumePaird(MapTransform):
    """Check a loaded, channel-first image/label pair: one volume each, same shape, same affine.

    Place it after ``LoadImaged`` + ``EnsureChannelFirstd`` and before any spatial transform.

    Args:
        image_key: key of the image.
        label_key: key of the label map (may be missing when ``allow_missing_keys``).
        spatial_dims: expected spatial dimensions (3 for volumes, 2 for 2D images).
        atol: tolerance on the affines, in mm.
        allow_missing_keys: accept items without a label.
        check_channels: require a single channel (volumes); off for 2D photographs (RGB) and their masks.

    Raises:
        ValueError: a 4D (multi-channel or time series) image where one volume is expected, or an image/label pair
            whose shapes or affines differ; the message names both files.
    """

    def __init__(
        self,
        image_key: str = "image",
        label_key: str = "label",
        spatial_dims: int = 3,
        atol: float = 1e-3,
        allow_missing_keys: bool = False,
        check_channels: bool = True,
    ) -> None:
        super().__init__([image_key, label_key], allow_missing_keys)
        self.image_key, self.label_key = image_key, label_key
        self.spatial_dims, self.atol, self.check_channels = spatial_dims, atol, check_channels

    def _check_single(self, img: torch.Tensor | np.ndarray, key: str) -> None:
        shape = tuple(img.shape)
        if len(shape) != self.spatial_dims + 1 or (self.check_channels and shape[0] != 1):
            raise ValueError(
                f"'{source_name(img, key)}' has shape {shape} (channel first): expected one {self.spatial_dims}D "
                "volume with a single channel; split multi-channel or 4D data into one file per volume first."
            )

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image = d[self.image_key]
        self._check_single(image, self.image_key)
        label = d.get(self.label_key)
        if label is None:
            if not self.allow_missing_keys:
                raise KeyError(f"Key '{self.label_key}' is missing from the data.")
            return d
        self._check_single(label, self.label_key)
        names = f"image '{source_name(image, 'image')}' and label '{source_name(label, 'label')}'"
        if tuple(image.shape[1:]) != tuple(label.shape[1:]):
            raise ValueError(
                f"The {names} differ in shape ({tuple(image.shape[1:])} vs {tuple(label.shape[1:])}); "
                "they must be on the same voxel grid."
            )
        if isinstance(image, MetaTensor) and isinstance(label, MetaTensor):
            difference = (image.affine.double() - label.affine.double()).abs().max().item()
            if difference > self.atol:
                raise ValueError(
                    f"The {names} differ in affine (largest difference {difference:.4g}); "
                    "they must be on the same voxel grid: resample the label onto the image first."
                )
        return d


class ReplaceNonFinited(MapTransform):
    """Replace NaN and infinite voxels with finite values, and say so: a warning naming the file and the count.

    NaN and -inf become the smallest finite value of the image, +inf the largest, so that intensity scaling and the
    model see a finite volume (one NaN would otherwise turn a whole normalised slice into NaN). The count is kept in
    the image's meta data under :data:`NONFINITE_KEY`, so that a batch job can report it per case. Place it right
    after loading.

    Raises:
        ValueError: the image has no finite voxel at all (the message names the file).
    """

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if not isinstance(img, torch.Tensor) or not img.is_floating_point():
                continue
            bad = ~torch.isfinite(img)
            count = int(bad.sum())
            if count:
                finite = img[~bad]
                if finite.numel() == 0:
                    raise ValueError(f"'{source_name(img, str(key))}' has no finite voxel (all NaN or infinite).")
                low, high = finite.min(), finite.max()
                img = img.clone()
                img[torch.isnan(img) | (img == -torch.inf)] = low
                img[img == torch.inf] = high
                logger.warning(
                    "'%s' has %d NaN or infinite voxels; they were replaced by the image's finite range.",
                    source_name(img, str(key)),
                    count,
                )
            if isinstance(img, MetaTensor):
                img.meta[NONFINITE_KEY] = count
            d[key] = img
        return d
