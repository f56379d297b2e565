# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Intensity presets that bring CT, MR and other images to [0, 1], and a grey-to-RGB channel repeat.

SAM-style networks take images in [0, 1] (see :class:`~samparser_monai.networks.sam.SamParser`); these dictionary
transforms get them there: a CT window (:class:`CTWindowd`), robust per-volume percentiles for MR
(:class:`PercentileNormalized`), and :class:`IntensityPresetd`, one transform configured by a preset name for bundle
configs. All work on numpy arrays, torch tensors and MONAI MetaTensors (metadata kept), channel first, any number of
spatial dimensions, and return float32 of the input's type (and device).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor

__all__ = [
    "CT_WINDOWS",
    "INTENSITY_PRESETS",
    "CTWindowd",
    "GreyToRGBd",
    "IntensityPresetd",
    "PercentileNormalized",
]

#: Standard CT display windows as ``(level, width)`` in Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "liver": (80.0, 150.0),
    "bone": (400.0, 1800.0),
    "lung": (-600.0, 1500.0),
    "brain": (40.0, 80.0),
    "mediastinum": (50.0, 350.0),
}

#: Preset names accepted by :class:`IntensityPresetd`.
INTENSITY_PRESETS: tuple[str, ...] = ("mr", "unit", "none", *(f"ct_{name}" for name in CT_WINDOWS))


def _as_float64(img: NdarrayOrTensor) -> torch.Tensor:
    """``img`` as a plain float64 torch tensor on its device (no metadata)."""
    return convert_to_tensor(img, dtype=torch.float64, track_meta=False)


def _to_output(out: torch.Tensor, img: NdarrayOrTensor) -> NdarrayOrTensor:
    """``out`` as float32 of the type of ``img`` (numpy, torch or MetaTensor with the metadata of ``img``)."""
    return convert_to_dst_type(out, img, dtype=torch.float32)[0]


def _clip_scale(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Clip ``x`` to ``[low, high]`` and map it linearly to [0, 1]; NaN -> 0; zeros when ``high <= low``."""
    if not high > low:  # constant image or empty valid set: nothing to scale
        return torch.zeros_like(x)
    out = (x.clamp(low, high) - low) / (high - low)
    return torch.nan_to_num(out, nan=0.0)


def _ct_window(img: NdarrayOrTensor, level: float, width: float) -> NdarrayOrTensor:
    x = _as_float64(img)
    low = level - width / 2.0
    return _to_output(_clip_scale(x, low, low + width), img)


def _valid_voxels(x: torch.Tensor, nonzero: bool) -> torch.Tensor:
    valid = torch.isfinite(x)
    if nonzero:
        valid &= x != 0
    return x[valid]


def _percentile_normalize(img: NdarrayOrTensor, lower: float, upper: float, nonzero: bool) -> NdarrayOrTensor:
    x = _as_float64(img)
    values = _valid_voxels(x, nonzero)
    if values.numel() == 0:
        return _to_output(torch.zeros_like(x), img)
    # numpy: torch.quantile refuses tensors of more than 2**24 elements, smaller than many CT/MR volumes
    low, high = np.percentile(values.cpu().numpy(), [lower, upper])
    out = _clip_scale(x, float(low), float(high))
    if nonzero:
        out = torch.where(x == 0, torch.zeros_like(out), out)
    return _to_output(out, img)


def _unit(img: NdarrayOrTensor) -> NdarrayOrTensor:
    x = _as_float64(img)
    values = _valid_voxels(x, nonzero=False)
    if values.numel() == 0:
        return _to_output(torch.zeros_like(x), img)
    return _to_output(_clip_scale(x, float(values.min()), float(values.max())), img)


class CTWindowd(MapTransform):
    """Clip CT intensities (HU) to a display window and scale them to [0, 1], as float32.

    Args:
        keys: keys of the images to transform.
        window: a name of :data:`CT_WINDOWS` (``"abdomen"``, ``"liver"``, ...) or ``(level, width)`` in HU;
            ``level - width / 2`` maps to 0 and ``level + width / 2`` to 1.
        allow_missing_keys: don't raise an exception if a key is missing.

    NaN voxels become 0.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self, keys: KeysCollection, window: str | Sequence[float] = "abdomen", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if isinstance(window, str):
            if window not in CT_WINDOWS:
                raise ValueError(f"Unknown CT window {window!r}; use one of {sorted(CT_WINDOWS)} or (level, width).")
            level, width = CT_WINDOWS[window]
        else:
            if len(window) != 2:
                raise ValueError(f"window must be a name or (level, width), got {window!r}.")
            level, width = float(window[0]), float(window[1])
        if not width > 0:
            raise ValueError(f"The window width must be positive, got {width}.")
        self.level, self.width = float(level), float(width)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = _ct_window(d[key], self.level, self.width)
        return d


class PercentileNormalized(MapTransform):
    """Clip each item to its own intensity percentiles and scale to [0, 1], as float32 (the MR preset).

    The percentiles are taken over all voxels of the item (all channels together), computed in float64, so that
    uint8 images and float volumes with wild ranges behave alike. NaN and infinite voxels are left out of the
    percentiles; NaN voxels become 0 (infinite ones clip to 0 or 1). A constant item (or one without valid voxels)
    becomes all zeros, without warnings.

    Args:
        keys: keys of the images to transform.
        lower: lower percentile in [0, 100], mapped to 0.
        upper: upper percentile in [0, 100], mapped to 1.
        nonzero: compute the percentiles over the voxels != 0 only; voxels == 0 stay 0 (background stays
            background).
        allow_missing_keys: don't raise an exception if a key is missing.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        keys: KeysCollection,
        lower: float = 0.5,
        upper: float = 99.5,
        nonzero: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"Percentiles must satisfy 0 <= lower < upper <= 100, got lower={lower}, upper={upper}.")
        self.lower, self.upper, self.nonzero = float(lower), float(upper), bool(nonzero)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = _percentile_normalize(d[key], self.lower, self.upper, self.nonzero)
        return d


class IntensityPresetd(MapTransform):
    """One intensity normalisation to [0, 1] chosen by name, for bundle configs.

    Args:
        keys: keys of the images to transform.
        preset: ``"mr"`` (:class:`PercentileNormalized` with its defaults), ``"ct_<window>"`` for a window of
            :data:`CT_WINDOWS` (``"ct_abdomen"``, ``"ct_liver"``, ... via :class:`CTWindowd`), ``"unit"`` (min-max
            of each item to [0, 1], NaN -> 0, constant -> 0) or ``"none"`` (identity: data returned unchanged).
        allow_missing_keys: don't raise an exception if a key is missing.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, keys: KeysCollection, preset: str, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        name = str(preset).lower()
        if name not in INTENSITY_PRESETS:
            raise ValueError(f"Unknown intensity preset {preset!r}; use one of {', '.join(INTENSITY_PRESETS)}.")
        self.preset = name
        self.transform: MapTransform | None = None
        if name == "mr":
            self.transform = PercentileNormalized(keys, allow_missing_keys=allow_missing_keys)
        elif name.startswith("ct_"):
            self.transform = CTWindowd(keys, window=name[3:], allow_missing_keys=allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        if self.preset == "none":
            return dict(data)
        if self.transform is not None:
            return self.transform(data)
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = _unit(d[key])
        return d


class GreyToRGBd(MapTransform):
    """Repeat a 1-channel (channel-first) image to 3 channels; 3-channel images pass through unchanged.

    Args:
        keys: keys of the images to transform.
        allow_missing_keys: don't raise an exception if a key is missing.

    Raises:
        ValueError: an image has neither 1 nor 3 channels.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.ndim < 2 or img.shape[0] not in (1, 3):
                raise ValueError(f"'{key}' must be channel first with 1 or 3 channels, got shape {tuple(img.shape)}.")
            if img.shape[0] == 3:
                continue
            if isinstance(img, torch.Tensor):
                d[key] = img.repeat(3, *([1] * (img.ndim - 1)))  # a MetaTensor keeps its metadata
            else:
                d[key] = np.repeat(np.asarray(img), 3, axis=0)
        return d
