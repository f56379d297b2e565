# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""3D prompts from a JSON file (voxel or world mm) for slice-wise inference, as the prompts of the
:class:`~samparser_monai.engines.prompt_engine.PromptEngine` or as per-slice boxes (the ``boxes`` baseline).

JSON format, one list of prompts per case id::

    {
        "hippocampus_001": [
            {"label": 1, "box": [i0, j0, k0, i1, j1, k1], "space": "voxel"},
            {"label": 2, "box": [x0, y0, z0, x1, y1, z1], "space": "world"},
            {"label": 3, "points": [[i, j, k], [i, j, k]], "point_labels": [1, 0], "space": "voxel"}
        ]
    }

``voxel`` coordinates are (inclusive) voxel indices of the input file as stored (what nibabel's array or a viewer's
IJK shows); ``world`` ones are RAS millimetres (the NIfTI/nibabel convention). How a box is used depends on the run's
prompt source: ``roi`` (a 3D box: propagated from its centre slice within it), ``key`` (a box on one slice, its key
slice, propagated from there), ``boxes`` (the same in-plane box on every slice it spans, a baseline). ``points``
entries are clicks: ``point_labels`` 1 for the object, 0 for background (default all 1).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from samparser_monai.engines.prompt_engine import ObjectPrompt
from samparser_monai.engines.slice_inference import SlicePrompts

__all__ = [
    "OBJECT_SOURCES",
    "box_to_oriented_voxels",
    "checked_bounds",
    "json_box_prompts",
    "json_object_prompts",
    "load_box_json",
    "plane_box",
    "points_to_oriented_voxels",
]

#: Prompt sources whose JSON entries become :class:`ObjectPrompt` objects of the prompt engine.
OBJECT_SOURCES = ("roi", "key", "points")


def load_box_json(path: str | os.PathLike) -> dict[str, list[dict]]:
    """Read and check a box JSON file (see the module docstring).

    Raises:
        ValueError: the file is not JSON of that shape (one sentence naming the file and the first bad entry).
    """
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"Box file '{path}' could not be read as JSON ({err}).") from err
    if not isinstance(content, Mapping):
        raise ValueError(f"Box file '{path}' must map case ids to lists of prompts.")
    for case, entries in content.items():
        for entry in entries if isinstance(entries, list) else [entries]:
            ok = (
                isinstance(entry, Mapping)
                and isinstance(entry.get("label"), int)
                and not isinstance(entry.get("label"), bool)
                and entry["label"] > 0
                and entry.get("space") in ("voxel", "world")
            )
            if ok and "points" in entry:
                ok = _valid_points(entry)
            elif ok:
                ok = isinstance(entry.get("box"), list) and len(entry["box"]) == 6 and all(map(_finite, entry["box"]))
            if not ok:
                raise ValueError(
                    f"Box file '{path}', case '{case}': each prompt needs a positive integer 'label', a 6-number "
                    f"'box' [x0, y0, z0, x1, y1, z1] or 'points' [[x, y, z], ...] (with optional 'point_labels' of "
                    f"1 and 0), and 'space' 'voxel' or 'world'; got {entry!r}."
                )
    return {str(k): list(v) if isinstance(v, list) else [v] for k, v in content.items()}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def _valid_points(entry: Mapping) -> bool:
    points = entry.get("points")
    if not isinstance(points, list) or not points:
        return False
    if not all(isinstance(p, list) and len(p) == 3 and all(map(_finite, p)) for p in points):
        return False
    labels = entry.get("point_labels", [1] * len(points))
    return isinstance(labels, list) and len(labels) == len(points) and all(v in (0, 1) for v in labels)


def points_to_oriented_voxels(
    points: Sequence[Sequence[float]], space: str, original_affine: np.ndarray, oriented_affine: np.ndarray
) -> np.ndarray:
    """Points (voxel indices of the stored file, or RAS mm) as ``P x 3`` voxel coordinates of the oriented volume."""
    homogeneous = np.concatenate([np.asarray(points, np.float64).reshape(-1, 3), np.ones((len(points), 1))], axis=1)
    world = homogeneous @ np.asarray(original_affine, np.float64).T if space == "voxel" else homogeneous
    return (world @ np.linalg.inv(np.asarray(oriented_affine, np.float64)).T)[:, :3]


def box_to_oriented_voxels(
    box: Sequence[float], space: str, original_affine: np.ndarray, oriented_affine: np.ndarray
) -> np.ndarray:
    """A 3D box (voxel indices of the stored file, or RAS mm) as inclusive index ranges ``[lo, hi]`` (2 x 3) of the
    oriented volume the network sees. Exact for the axis permutations and flips that orientation applies."""
    corners = np.array(list(itertools.product(*zip(box[:3], box[3:]))), dtype=np.float64)  # 8 x 3
    homogeneous = np.concatenate([corners, np.ones((8, 1))], axis=1)
    world = homogeneous @ np.asarray(original_affine, np.float64).T if space == "voxel" else homogeneous
    voxels = world @ np.linalg.inv(np.asarray(oriented_affine, np.float64)).T
    return np.stack([voxels[:, :3].min(axis=0), voxels[:, :3].max(axis=0)])


def plane_box(bounds: np.ndarray, axis: int) -> torch.Tensor:
    """(x0, y0, x1, y1) of a slice: y along the first remaining axis, x along the second (the last tensor axis)."""
    rows, cols = [a for a in range(3) if a != axis]
    return torch.tensor([bounds[0, cols], bounds[0, rows], bounds[1, cols], bounds[1, rows]], dtype=torch.float32)


def _extent_sentence(shape: Sequence[int]) -> str:
    return f"the image's voxel extent is [0, 0, 0] to {[int(v) - 1 for v in shape]} (oriented)"


def checked_bounds(
    entry: Mapping, original_affine: np.ndarray, oriented_affine: np.ndarray, shape: Sequence[int], axis: int = 2
) -> np.ndarray:
    """A prompt's box as inclusive index bounds (2 x 3) of the oriented volume, clipped to it.

    Corners may come in either order (an inverted box is the same box). Raises ``ValueError`` (one sentence naming
    the box and the image's extent) when the box lies wholly outside the image or has zero size in the slice plane.
    """
    extent = np.asarray(shape, np.float64) - 1
    bounds = np.round(box_to_oriented_voxels(entry["box"], entry["space"], original_affine, oriented_affine), 3)
    if np.any(bounds[1] < 0) or np.any(bounds[0] > extent):
        raise ValueError(
            f"Prompt box {entry['box']} ({entry['space']}) lies outside the image: {_extent_sentence(shape)}."
        )
    bounds = np.clip(bounds, 0, extent)
    rows, cols = [a for a in range(3) if a != axis]
    if bounds[1, rows] - bounds[0, rows] < 1 or bounds[1, cols] - bounds[0, cols] < 1:
        raise ValueError(f"Prompt box {entry['box']} ({entry['space']}) has zero size in the slice plane.")
    return bounds


def json_box_prompts(
    entries: Sequence[Mapping],
    original_affine: np.ndarray,
    oriented_affine: np.ndarray,
    shape: Sequence[int],
    axis: int = 2,
) -> SlicePrompts:
    """Slice prompts from JSON 3D boxes: each box prompts every slice it spans, clipped to the volume.

    Raises:
        ValueError: a box outside the image or of zero size in the slice plane (see :func:`checked_bounds`).
    """
    prompts: SlicePrompts = {}
    for entry in entries:
        if "box" not in entry:
            raise ValueError(f"Prompt {dict(entry)!r} has no 'box': --prompt boxes needs boxes.")
        bounds = checked_bounds(entry, original_affine, oriented_affine, shape, axis)
        box = plane_box(bounds, axis)
        for s in range(int(np.ceil(bounds[0, axis])), int(np.floor(bounds[1, axis])) + 1):
            prompts.setdefault(s, []).append((int(entry["label"]), box.clone()))
    return prompts


def json_object_prompts(
    entries: Sequence[Mapping],
    source: str,
    original_affine: np.ndarray,
    oriented_affine: np.ndarray,
    shape: Sequence[int],
    axis: int = 2,
) -> list[ObjectPrompt]:
    """Prompt-engine objects from JSON entries, checked against the image they apply to.

    Args:
        entries: the case's prompts (see the module docstring).
        source: ``"roi"`` (each box is a 3D ROI), ``"key"`` (each box lies on its key slice; the middle slice of
            its extent is used) or ``"points"`` (click entries; a box given with clicks is their ROI).
        original_affine: affine of the file as stored (voxel prompts are in its indices).
        oriented_affine: affine of the oriented volume the network sees.
        shape: spatial shape of that volume.
        axis: slicing axis.

    Raises:
        ValueError: a prompt outside the image, of zero size, or of the wrong kind for ``source`` (one sentence
            naming the prompt and the image's extent).
    """
    if source not in OBJECT_SOURCES:
        raise ValueError(f"Unknown object prompt source {source!r}; use one of {list(OBJECT_SOURCES)}.")
    extent = np.asarray(shape, np.float64) - 1
    objects = []
    for entry in entries:
        if source == "points" and "points" not in entry:
            raise ValueError(f"Prompt {dict(entry)!r} has no 'points': --prompt points needs clicks.")
        if source != "points" and "box" not in entry:
            raise ValueError(f"Prompt {dict(entry)!r} has no 'box': --prompt {source} needs boxes.")
        label = int(entry["label"])
        box = clip = z_range = points = point_labels = None
        if "box" in entry:
            bounds = checked_bounds(entry, original_affine, oriented_affine, shape, axis)
            box = plane_box(bounds, axis)
            z_range = (int(np.ceil(bounds[0, axis])), int(np.floor(bounds[1, axis])))
            clip = box.clone()
        if "points" in entry:
            coords = points_to_oriented_voxels(entry["points"], entry["space"], original_affine, oriented_affine)
            coords = np.round(coords, 3)
            outside = np.any((coords < -0.5) | (coords > extent + 0.5), axis=1)
            if outside.any():
                bad = entry["points"][int(np.argmax(outside))]
                raise ValueError(f"Click {bad} ({entry['space']}) lies outside the image: {_extent_sentence(shape)}.")
            coords = np.clip(coords, 0, extent)
            rows, cols = [a for a in range(3) if a != axis]
            points = torch.tensor(coords[:, [cols, rows, axis]], dtype=torch.float32)  # (x, y, slice)
            point_labels = torch.tensor(entry.get("point_labels", [1] * len(coords)), dtype=torch.float32)
            if not bool((point_labels > 0).any()):
                raise ValueError(f"Prompt {dict(entry)!r} has no positive click: mark the object with a 1.")
            if box is not None:  # an ROI with the clicks: a positive click outside it could start nothing
                positive = coords[point_labels.numpy() > 0]
                beyond = np.any((positive < bounds[0] - 0.5) | (positive > bounds[1] + 0.5), axis=1)
                if beyond.any():
                    bad = [p for p, v in zip(entry["points"], entry.get("point_labels", [1] * len(coords))) if v > 0]
                    raise ValueError(f"Click {bad[int(np.argmax(beyond))]} ({entry['space']}) lies outside its box.")
        if source == "points":
            positive = points[point_labels > 0]
            start = int(torch.mode(positive[:, 2].round().long()).values)  # the slice with the most positive clicks
            objects.append(
                ObjectPrompt(label, start, None, points, point_labels, z_range, clip if "box" in entry else None)
            )
        elif source == "key":
            key = int(round(float(np.mean(z_range))))
            if "roi" in entry:  # a 3D box the propagation must stay within (a client's ROI around its click)
                limits = checked_bounds({**entry, "box": entry["roi"]}, original_affine, oriented_affine, shape, axis)
                z_range = (int(np.ceil(limits[0, axis])), int(np.floor(limits[1, axis])))
                objects.append(ObjectPrompt(label, key, box, z_range=z_range, clip=plane_box(limits, axis)))
            else:
                objects.append(ObjectPrompt(label, key, box))
        else:
            centre = (z_range[0] + z_range[1]) // 2
            objects.append(ObjectPrompt(label, centre, box, z_range=z_range, clip=clip))
    return objects
