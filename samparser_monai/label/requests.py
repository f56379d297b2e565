# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""From a MONAI Label request (an ROI and/or clicks, in voxel indices of the stored image) to the 3D box prompts
that :class:`~samparser_monai.engines.volume_inference.VolumeSegmenter` takes.

* an ROI spanning several slices: the prompt engine's ``roi`` prompt (its centre slice from its in-plane box, then
  propagated slice by slice, never leaving the ROI);
* an ROI one slice thick (a rectangle drawn on one slice): that box, propagated slice to slice;
* foreground clicks: on each clicked slice, a box around the clicks (``click_box_mm`` wide; the ROI's in-plane extent
  when an ROI is given too), propagated slice to slice;
* foreground clicks to a model fine-tuned with clicks (``train_click_fraction`` > 0, ``click_points=True``): the
  clicks themselves, as the engine's ``points`` prompt (background clicks with them as negative points; an ROI
  spanning slices bounds the propagation);
* background clicks: the connected piece of the result that a background click lands on is removed
  (:func:`~samparser_monai.label.refine.refine_mask`).

The result is kept within the ROI; a propagated one without an ROI spanning slices within a box as deep as the
prompt is wide (the click box, or the one-slice ROI), as propagation on real images runs on past the object.

3D Slicer sends ``roi`` as ``[i0, i1, j0, j1, k0, k1]``; ``[[i0, i1], [j0, j1], [k0, k1]]`` and swapped bounds are
accepted too. Bounds are inclusive voxel indices; an ROI reaching past the image is clipped to it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from samparser_monai.label.config import DEFAULT_CLICK_BOX_MM
from samparser_monai.label.geometry import ImageGeometry

__all__ = ["PromptPlan", "RequestError", "parse_points", "parse_roi", "plan_prompts"]

_AXES = "IJK"
_ROI_FORMAT = "[i0, i1, j0, j1, k0, k1] or [[i0, i1], [j0, j1], [k0, k1]] (voxel indices)"


class RequestError(ValueError):
    """A request that cannot be served as sent; ``status`` is the HTTP status code to answer with.

    Args:
        message: one sentence saying what is wrong and how to fix it.
        status: HTTP status code (a 4xx).
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class PromptPlan:
    """What to run for one request.

    Attributes:
        source: ``"roi"`` (a 3D box: its centre slice segmented, then propagated within it by the prompt engine),
            ``"propagate"`` (a key-slice box carried on by the same engine) or ``"points"`` (clicks, the same engine).
        boxes: prompt entries for :meth:`~samparser_monai.engines.volume_inference.VolumeSegmenter.segment`
            (``{"box": [i0, j0, k0, i1, j1, k1], "space": "voxel", "label": 1}``; for ``"points"``, ``"points"``
            ``[[i, j, k], ...]`` and ``"point_labels"``, with a ``"box"`` only for an ROI).
        keep: ``3 x 2`` inclusive voxel bounds the result is clipped to, or None.
        background: background clicks (voxel indices) whose connected piece of the result is removed.
        clicks_as_boxes: the foreground clicks became boxes around them (a model not trained with clicks); the app
            then propagates with the stock rule, whatever the model.
    """

    source: str
    boxes: list[dict[str, Any]]
    keep: np.ndarray | None = None
    background: list[tuple[int, int, int]] = field(default_factory=list)
    clicks_as_boxes: bool = False


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _decoded(value: Any) -> Any:
    """A JSON string (as a query parameter would carry it) decoded; anything else as is."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def parse_roi(roi: Any) -> np.ndarray | None:
    """The ROI as ``3 x 2`` integer ``[[i0, i1], [j0, j1], [k0, k1]]`` with ``lo <= hi``; None when absent or empty.

    Raises:
        RequestError: not 6 numbers in one of the accepted layouts.
    """
    roi = _decoded(roi)
    if roi is None or (isinstance(roi, (list, tuple)) and len(roi) == 0):
        return None
    flat: list[Any] = []
    if isinstance(roi, (list, tuple)) and len(roi) == 6:
        flat = list(roi)
    elif isinstance(roi, (list, tuple)) and len(roi) == 3 and all(isinstance(p, (list, tuple)) for p in roi):
        flat = [v for pair in roi for v in pair] if all(len(p) == 2 for p in roi) else []
    numbers = [_number(v) for v in flat]
    if len(numbers) != 6 or any(v is None for v in numbers):
        raise RequestError(f"roi must be {_ROI_FORMAT}; got {roi!r}.")
    bounds = np.rint(np.asarray(numbers, np.float64).reshape(3, 2)).astype(np.int64)
    return np.sort(bounds, axis=1)


def parse_points(points: Any, name: str) -> list[tuple[int, int, int]]:
    """Clicks as ``(i, j, k)`` voxel indices; ``[]`` when absent.

    Raises:
        RequestError: not a list of 3-number lists.
    """
    points = _decoded(points)
    if points is None:
        return []
    parsed = []
    for point in points if isinstance(points, (list, tuple)) else [points]:
        numbers = [_number(v) for v in point] if isinstance(point, (list, tuple)) else []
        if len(numbers) != 3 or any(v is None for v in numbers):
            raise RequestError(f"{name} must be a list of [i, j, k] voxel indices; got {points!r}.")
        parsed.append(tuple(int(round(v)) for v in numbers))
    return parsed


def _clip_roi(roi: np.ndarray, shape: Sequence[int], plane: Sequence[int]) -> np.ndarray:
    """The ROI clipped to the image; refuses one wholly outside it, or one without a box's extent in-plane."""
    last = np.asarray(shape, np.int64) - 1
    if np.any(roi[:, 1] < 0) or np.any(roi[:, 0] > last):
        raise RequestError(
            f"roi {roi.tolist()} lies outside the image, whose voxel indices run from [0, 0, 0] to {last.tolist()}."
        )
    clipped = np.stack([np.maximum(roi[:, 0], 0), np.minimum(roi[:, 1], last)], axis=1)
    thin = [a for a in plane if clipped[a, 1] - clipped[a, 0] < 1]
    if thin:
        names = " and ".join(_AXES[a] for a in thin)
        raise RequestError(
            f"roi {roi.tolist()} is empty: it must span at least 2 voxels along {names} to make a box on the slices."
        )
    return clipped


def _check_inside(points: Sequence[tuple[int, int, int]], shape: Sequence[int], name: str) -> None:
    for point in points:
        if any(not 0 <= v < s for v, s in zip(point, shape)):
            raise RequestError(
                f"{name} click {list(point)} lies outside the image, whose voxel indices run from [0, 0, 0] to "
                f"{[s - 1 for s in shape]}."
            )


def _width_mm(bounds: np.ndarray, plane: Sequence[int], geometry: ImageGeometry) -> float:
    """The larger in-plane side of ``bounds`` (inclusive voxel bounds), in millimetres."""
    return max(float((bounds[a, 1] - bounds[a, 0] + 1) * geometry.spacing[a]) for a in plane)


def _bounded(
    bounds: np.ndarray, keys: tuple[int, int], through: int, depth_mm: float, geometry: ImageGeometry
) -> np.ndarray:
    """Integer ``3 x 2`` bounds: ``bounds`` in-plane, the key slices +- ``depth_mm / 2`` through-plane, in the image.

    Propagation carries a box on until the model finds nothing, which on real images can be far past the object; a
    propagated result is kept within this box, as deep as the prompt is wide.
    """
    reach = depth_mm / 2.0 / float(geometry.spacing[through])
    out = np.asarray(bounds, np.float64).copy()
    out[through] = (keys[0] - reach, keys[1] + reach)
    out = np.stack([np.floor(out[:, 0] + 1e-6), np.ceil(out[:, 1] - 1e-6)], axis=1)
    return np.clip(out, 0, np.asarray(geometry.shape)[:, None] - 1).astype(np.int64)


def _entry(bounds: np.ndarray) -> dict[str, Any]:
    """A box entry in voxel space from ``3 x 2`` bounds."""
    return {"box": [float(v) for v in (*bounds[:, 0], *bounds[:, 1])], "space": "voxel", "label": 1}


def plan_prompts(
    request: Mapping[str, Any],
    geometry: ImageGeometry,
    axis: int = 2,
    click_box_mm: float = DEFAULT_CLICK_BOX_MM,
    click_points: bool = False,
) -> PromptPlan:
    """The prompts of a request (``roi``, ``foreground``, ``background``) on an image of ``geometry``.

    Args:
        request: the request's parameters.
        geometry: the stored image's geometry.
        axis: slicing axis of the RAS-oriented volume the network sees.
        click_box_mm: side of the box grown around clicks, in millimetres (the request may set it too).
        click_points: send clicks to the model as clicks (a model fine-tuned with ``train_click_fraction`` > 0)
            instead of boxes around them (a model that only knows boxes).

    Raises:
        RequestError: no prompt, a malformed or empty ROI, or a click or ROI outside the image (one sentence each).
    """
    shape = tuple(geometry.shape)
    if len(shape) != 3 or min(shape) < 1:
        raise RequestError(f"This model segments 3D volumes; the image has shape {list(shape)}.", status=422)
    roi = parse_roi(request.get("roi"))
    foreground = parse_points(request.get("foreground"), "foreground")
    background = parse_points(request.get("background"), "background")
    _check_inside(foreground, shape, "foreground")
    _check_inside(background, shape, "background")
    through = geometry.stored_axis(axis)  # the stored axis the slices are taken along
    plane = [a for a in range(3) if a != through]
    if roi is not None:
        roi = _clip_roi(roi, shape, plane)
    if roi is None and not foreground:
        if background:
            raise RequestError("Background clicks alone mark no object: add a foreground click or an roi.")
        raise RequestError(
            f"The request has no prompt: send an roi {_ROI_FORMAT} and/or foreground clicks [[i, j, k]]."
        )
    if not foreground:
        return _roi_plan(roi, through, plane, geometry, background)
    if click_points:
        return _points_plan(foreground, roi, through, plane, geometry, background)
    raw_size = _decoded(request.get("click_box_mm", click_box_mm))
    size = _number(raw_size)
    if size is None or size <= 0:
        raise RequestError(f"click_box_mm must be a positive number of millimetres; got {raw_size!r}.")
    return _click_plan(foreground, roi, size, through, plane, geometry, background)


def _roi_plan(
    roi: np.ndarray, through: int, plane: Sequence[int], geometry: ImageGeometry, background: list[tuple[int, int, int]]
) -> PromptPlan:
    """An ROI alone: a box on every slice it spans, or, one slice thick, its box propagated."""
    if roi[through, 1] > roi[through, 0]:
        return PromptPlan("roi", [_entry(roi)], roi, background)
    key = (int(roi[through, 0]),) * 2
    keep = _bounded(roi, key, through, _width_mm(roi, plane, geometry), geometry)
    return PromptPlan("propagate", [_entry(roi)], keep, background)


def _points_plan(
    foreground: list[tuple[int, int, int]],
    roi: np.ndarray | None,
    through: int,
    plane: Sequence[int],
    geometry: ImageGeometry,
    background: list[tuple[int, int, int]],
) -> PromptPlan:
    """Clicks as the engine's ``points`` prompt: started on the slice with the most foreground clicks, propagated
    with the stop rule, within the ROI when one spans slices; the result is kept inside an ROI (in-plane only for a
    one-slice ROI)."""
    spans_slices = roi is not None and roi[through, 1] > roi[through, 0]
    if roi is not None:
        _check_in_roi(foreground, roi, range(3) if spans_slices else plane)
    entry: dict[str, Any] = {
        "points": [[float(v) for v in p] for p in (*foreground, *background)],
        "point_labels": [1] * len(foreground) + [0] * len(background),
        "space": "voxel",
        "label": 1,
    }
    keep = None
    if roi is not None:
        keep = roi.copy()
        if spans_slices:
            entry["box"] = _entry(roi)["box"]
        else:
            keep[through] = (0, geometry.shape[through] - 1)
    return PromptPlan("points", [entry], keep, background)


def _check_in_roi(foreground: Sequence[tuple[int, int, int]], roi: np.ndarray, axes: Sequence[int]) -> None:
    outside = [p for p in foreground if any(not roi[a, 0] <= p[a] <= roi[a, 1] for a in axes)]
    if outside:
        raise RequestError(
            f"foreground click {list(outside[0])} lies outside the roi {roi.tolist()}: click inside it, or send "
            "the click without the roi."
        )


def _click_plan(
    foreground: list[tuple[int, int, int]],
    roi: np.ndarray | None,
    size_mm: float,
    through: int,
    plane: Sequence[int],
    geometry: ImageGeometry,
    background: list[tuple[int, int, int]],
) -> PromptPlan:
    """Foreground clicks (with or without an ROI): one propagated box per clicked slice."""
    spans_slices = roi is not None and roi[through, 1] > roi[through, 0]
    if roi is not None:  # a one-slice ROI only bounds the box, not the key slice
        _check_in_roi(foreground, roi, range(3) if spans_slices else plane)
    half = size_mm / 2.0 / geometry.spacing
    last = np.asarray(geometry.shape, np.float64) - 1
    entries = []
    for key in sorted({p[through] for p in foreground}):
        if roi is not None:
            bounds = roi.astype(np.float64)
        else:
            clicks = np.asarray([p for p in foreground if p[through] == key], np.float64)
            bounds = np.clip(np.stack([clicks.min(axis=0) - half, clicks.max(axis=0) + half], axis=1), 0, last[:, None])
        bounds[through] = key
        entries.append(_entry(bounds))
    if spans_slices:  # propagation stays within the ROI: nothing outside it is encoded or kept
        entries = [{**entry, "roi": _entry(roi)["box"]} for entry in entries]
        return PromptPlan("propagate", entries, roi, background, clicks_as_boxes=True)
    boxes = np.asarray([e["box"] for e in entries]).reshape(-1, 2, 3)
    union = np.stack([boxes[:, 0].min(axis=0), boxes[:, 1].max(axis=0)], axis=1)
    keys = (int(union[through, 0]), int(union[through, 1]))
    depth = _width_mm(roi, plane, geometry) if roi is not None else size_mm
    keep = _bounded(union, keys, through, depth, geometry)
    return PromptPlan("propagate", entries, keep, background, clicks_as_boxes=True)
