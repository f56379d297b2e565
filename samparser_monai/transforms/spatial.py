# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Resize the longest side and pad to a square, SAM's input geometry, as an invertible MONAI transform.

:class:`ResizeLongestPadd` resizes 2D channel-first images so that the longest side is ``spatial_size`` (keeping the
aspect ratio, with the rounding :class:`~samparser_monai.networks.sam.SamParser` uses), pads the bottom/right with
zeros to ``spatial_size x spatial_size`` and scales box prompts to match. Its ``inverse`` (directly or through
MONAI's ``Invertd``) crops the padding and resizes back, so predictions come back on the original pixel grid. The
plain functions :func:`resize_longest_pad`, :func:`undo_resize_longest_pad` and :func:`scale_box` do the same outside
dictionary pipelines.

Geometry: pixel centres are aligned (``align_corners=False`` for linear modes, ``"nearest-exact"`` for labels), so an
upscaled label resized back with ``"nearest-exact"`` is exactly the original label.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor, get_track_meta
from monai.transforms import InvertibleTransform, MapTransform
from monai.transforms.utils import scale_affine
from monai.utils import TraceKeys, TransformBackends, convert_to_dst_type, convert_to_numpy, convert_to_tensor

__all__ = [
    "RESIZE_MODES",
    "ResizeLongestPadd",
    "resize_longest_pad",
    "resized_size",
    "scale_box",
    "undo_resize_longest_pad",
]

#: Interpolation modes of :func:`resize_longest_pad` (``torch.nn.functional.interpolate`` names).
RESIZE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")
_NEAREST = ("nearest", "nearest-exact")


def resized_size(height: int, width: int, spatial_size: int) -> tuple[tuple[int, int], float]:
    """The size ``(h, w)`` whose longest side is ``spatial_size`` (aspect kept, SamParser's rounding) and the scale."""
    if height < 1 or width < 1 or spatial_size < 1:
        raise ValueError(f"Sizes must be positive, got {height} x {width} -> {spatial_size}.")
    scale = spatial_size / max(height, width)
    return (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))), scale


def _check_mode(mode: str) -> str:
    if mode not in RESIZE_MODES:
        raise ValueError(f"Unknown interpolation mode {mode!r}; use one of {', '.join(RESIZE_MODES)}.")
    return mode


def _nearest_index(n_in: int, n_out: int, exact: bool, device: torch.device) -> torch.Tensor:
    """Source indices of nearest-neighbour resampling from ``n_in`` to ``n_out`` samples (float64 arithmetic)."""
    i = torch.arange(n_out, dtype=torch.float64, device=device)
    src = torch.floor((i + 0.5) * (n_in / n_out)) if exact else torch.floor(i * (n_in / n_out))
    return src.long().clamp_(0, n_in - 1)


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize the last two axes of a plain tensor; nearest modes keep the dtype, the others give float32."""
    h_in, w_in = x.shape[-2:]
    if mode in _NEAREST:
        if (h_in, w_in) == size:
            return x.clone()
        exact = mode == "nearest-exact"
        rows = _nearest_index(h_in, size[0], exact, x.device)
        cols = _nearest_index(w_in, size[1], exact, x.device)
        return x[..., rows[:, None], cols[None, :]]  # exact gather: any dtype (labels, bool), no rounding
    x = x.to(torch.float32)
    if (h_in, w_in) == size:
        return x.clone()
    linear = mode in ("bilinear", "bicubic")
    shrink = size[0] < h_in or size[1] < w_in
    flat = x.reshape(1, -1, h_in, w_in)
    out = F.interpolate(
        flat, size=size, mode=mode, align_corners=False if linear else None, antialias=linear and shrink
    )
    return out.reshape(*x.shape[:-2], *size)


def _plain(img: NdarrayOrTensor) -> torch.Tensor:
    x = convert_to_tensor(img, track_meta=False)
    if x.ndim < 2:
        raise ValueError(f"The image must have at least two (spatial) axes, got shape {tuple(x.shape)}.")
    return x


def resize_longest_pad(
    img: NdarrayOrTensor, spatial_size: int, mode: str = "bilinear"
) -> tuple[NdarrayOrTensor, dict[str, Any]]:
    """Resize the last two axes so the longest side is ``spatial_size``, then zero-pad bottom/right to a square.

    Args:
        img: ``... x H x W`` (e.g. channel-first ``C x H x W``), numpy or torch.
        spatial_size: the output side.
        mode: one of :data:`RESIZE_MODES`; ``"bilinear"``/``"bicubic"`` use ``align_corners=False`` and
            anti-aliasing when shrinking; nearest modes gather pixels exactly and keep the dtype (labels), the others
            return float32.

    Returns:
        the image ``... x spatial_size x spatial_size`` of the input's type (a MetaTensor keeps its metadata unchanged;
        :class:`ResizeLongestPadd` also tracks the affine), and ``info``: ``orig_size`` ``(H, W)``, ``resized_size``
        ``(h, w)``, ``spatial_size`` and ``scale`` (``spatial_size / max(H, W)``).
    """
    x = _plain(img)
    orig = (int(x.shape[-2]), int(x.shape[-1]))
    size, scale = resized_size(*orig, int(spatial_size))
    resized = _resize(x, size, _check_mode(mode))
    out = resized.new_zeros((*resized.shape[:-2], spatial_size, spatial_size))
    out[..., : size[0], : size[1]] = resized
    info = {"orig_size": orig, "resized_size": size, "spatial_size": int(spatial_size), "scale": scale}
    return convert_to_dst_type(out, img, dtype=out.dtype)[0], info


def _sizes(info: Mapping[str, Any]) -> tuple[tuple[int, int], tuple[int, int], int]:
    """``orig_size``, ``resized_size`` and ``spatial_size`` of an info dict as Python ints (collated values too)."""
    orig = tuple(int(v) for v in convert_to_numpy(info["orig_size"], wrap_sequence=True).reshape(-1))
    size = tuple(int(v) for v in convert_to_numpy(info["resized_size"], wrap_sequence=True).reshape(-1))
    if "spatial_size" in info:
        side = int(convert_to_numpy(info["spatial_size"], wrap_sequence=True).reshape(-1)[0])
    else:
        side = max(size)
    if len(orig) != 2 or len(size) != 2:
        raise ValueError(f"info must hold 2D orig_size and resized_size, got {orig} and {size}.")
    return orig, size, side  # type: ignore[return-value]


def undo_resize_longest_pad(img: NdarrayOrTensor, info: Mapping[str, Any], mode: str = "bilinear") -> NdarrayOrTensor:
    """Invert :func:`resize_longest_pad`: crop the padding and resize the last two axes back to ``orig_size``.

    Args:
        img: ``... x S x S`` with ``S = info["spatial_size"]`` (e.g. a prediction on the padded grid).
        info: the ``info`` returned by :func:`resize_longest_pad`.
        mode: one of :data:`RESIZE_MODES`; ``"nearest-exact"`` for labels (exact when the forward resize was an
            upscale with ``"nearest-exact"``), ``"bilinear"`` for images, probabilities or logits.

    Returns:
        ``... x H x W`` of the input's type (a MetaTensor keeps its metadata unchanged).
    """
    x = _plain(img)
    orig, size, side = _sizes(info)
    if tuple(x.shape[-2:]) != (side, side):
        raise ValueError(f"Expected a {side} x {side} image to undo the resize/pad, got {tuple(x.shape[-2:])}.")
    out = _resize(x[..., : size[0], : size[1]], orig, _check_mode(mode))
    return convert_to_dst_type(out, img, dtype=out.dtype)[0]


def scale_box(
    box: NdarrayOrTensor | Sequence[float], info: Mapping[str, Any], inverse: bool = False
) -> NdarrayOrTensor:
    """Scale ``(x0, y0, x1, y1)`` boxes (``... x 4``) from the original to the resized grid, or back (``inverse``).

    x scales by ``w / W`` and y by ``h / H`` (resized over original size, as SAM's ``ResizeLongestSide``); padding at
    the bottom/right moves nothing. Returns the input's type (a sequence gives a torch tensor), float32 unless the
    input is float64.
    """
    (h0, w0), (h1, w1), _ = _sizes(info)
    factors = torch.tensor([w1 / w0, h1 / h0] * 2, dtype=torch.float64)
    boxes = convert_to_tensor(box, dtype=None, track_meta=False, wrap_sequence=True)
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"Boxes must be ... x 4 (x0, y0, x1, y1), got shape {tuple(boxes.shape)}.")
    dtype = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    factors = factors.to(boxes.device)
    out = (boxes.to(torch.float64) / factors if inverse else boxes.to(torch.float64) * factors).to(dtype)
    if isinstance(box, (np.ndarray, torch.Tensor)):
        return convert_to_dst_type(out, box, dtype=out.dtype)[0]
    return out


def _with_affine(img: NdarrayOrTensor, affine: np.ndarray) -> NdarrayOrTensor:
    """Compose a spatial affine into a MetaTensor's affine (and pixdim), without tracing; others pass through."""
    if not isinstance(img, MetaTensor):
        return img
    meta = InvertibleTransform.track_transform_meta(img, affine=affine, transform_info=None)
    return img.copy_meta_from(meta)


class ResizeLongestPadd(MapTransform, InvertibleTransform):
    """Resize 2D images so the longest side is ``spatial_size``, zero-pad to a square, scale boxes; invertible.

    Args:
        keys: keys of the channel-first 2D images/labels (``C x H x W``, all of the same ``H x W``).
        spatial_size: the output side ``S``; outputs are ``C x S x S``.
        mode: interpolation per key (:data:`RESIZE_MODES`), or one mode for all; default None = ``"bilinear"``
            for the first key and ``"nearest-exact"`` for the others (``("bilinear", "nearest-exact")`` for
            ``keys=("image", "label")``).
        box_keys: keys of ``N x 4`` boxes ``(x0, y0, x1, y1)`` in pixels of the input, scaled by ``(w / W, h / H)``
            (missing box keys are skipped).
        allow_missing_keys: don't raise an exception if an image key is missing (default True, so that one
            transform serves training with labels and inference without).

    Each image key becomes a MetaTensor (numpy arrays and plain tensors are converted, as MONAI's own spatial
    transforms do, so that the applied operation can be recorded); a MetaTensor keeps its metadata and its affine
    is updated for the resize. The original size, the resized size, the side and the scale are pushed with
    ``push_transform`` (``extra_info``), so :meth:`inverse` and MONAI's ``Invertd`` map images, labels and
    predictions (``C x S x S``, any C) back to ``C x H x W``: crop the padding, resize back with the key's mode.
    A ``"nearest"`` inverse (which ``Invertd`` asks for by default, ``nearest_interp=True``) is done as
    ``"nearest-exact"``, pixel-centre aligned like the forward resize, so an upscaled label comes back exactly;
    torch's legacy ``"nearest"`` is half a pixel off. :meth:`inverse` also scales the boxes in ``box_keys`` back.
    Nearest modes keep the dtype (labels stay integer), other modes give float32. With metadata tracking off
    (``set_track_meta(False)``) nothing is recorded and there is no inverse.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        keys: KeysCollection,
        spatial_size: int,
        mode: str | Sequence[str] | None = None,
        box_keys: str | Sequence[str] | None = ("box",),
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if int(spatial_size) < 1:
            raise ValueError(f"spatial_size must be a positive int, got {spatial_size}.")
        self.spatial_size = int(spatial_size)
        if mode is None:
            modes = ("bilinear",) + ("nearest-exact",) * (len(self.keys) - 1)
        elif isinstance(mode, str):
            modes = (mode,) * len(self.keys)
        else:
            modes = tuple(mode)
            if len(modes) != len(self.keys):
                raise ValueError(f"Give one mode per key ({len(self.keys)} keys), got {len(modes)} modes.")
        self.mode = tuple(_check_mode(m) for m in modes)
        self.box_keys: tuple[str, ...] = (box_keys,) if isinstance(box_keys, str) else tuple(box_keys or ())

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        info: dict[str, Any] | None = None
        for key, mode in self.key_iterator(d, self.mode):
            img = convert_to_tensor(d[key], track_meta=get_track_meta())
            if img.ndim != 3:
                raise ValueError(f"'{key}' must be a channel-first 2D image C x H x W, got shape {tuple(img.shape)}.")
            out, key_info = resize_longest_pad(img, self.spatial_size, mode)
            if info is not None and key_info["orig_size"] != info["orig_size"]:
                raise ValueError(f"'{key}' is {key_info['orig_size']} but an earlier key is {info['orig_size']}.")
            info = key_info
            extra = {
                "mode": mode,
                "orig_size": list(key_info["orig_size"]),
                "resized_size": list(key_info["resized_size"]),
                "spatial_size": key_info["spatial_size"],
                "scale": key_info["scale"],
            }
            affine = scale_affine(key_info["orig_size"], key_info["resized_size"])
            d[key] = self.push_transform(out, orig_size=key_info["orig_size"], extra_info=extra, affine=affine)
        present = [k for k in self.box_keys if k in d]
        if present and info is None:
            raise ValueError(f"Boxes {present} need an image key of {list(self.keys)} to take the size from.")
        for box_key in present:
            d[box_key] = scale_box(d[box_key], info)  # type: ignore[arg-type]
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Crop the padding and resize each image key back (with its recorded mode); scale boxes back."""
        d = dict(data)
        info: dict[str, Any] | None = None
        for key in self.key_iterator(d):
            transform = self.pop_transform(d[key])
            extra = transform[TraceKeys.EXTRA_INFO]
            mode = extra["mode"]
            mode = str(mode[0] if isinstance(mode, (list, tuple)) else mode)  # collated/decollated traces
            mode = "nearest-exact" if mode == "nearest" else mode
            out = undo_resize_longest_pad(d[key], extra, mode)
            orig, size, _ = _sizes(extra)
            d[key] = _with_affine(out, scale_affine(size, orig))
            info = {"orig_size": orig, "resized_size": size}
        if info is not None:
            for box_key in self.box_keys:
                if box_key in d:
                    d[box_key] = scale_box(d[box_key], info, inverse=True)
        return d
