# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""3D prompts for slice-wise inference: boxes from a JSON file (voxel or world mm), and propagation of one key-slice
box through the neighbouring slices.

JSON format, one list of prompts per case id::

    {
        "hippocampus_001": [
            {"label": 1, "box": [i0, j0, k0, i1, j1, k1], "space": "voxel"},
            {"label": 2, "box": [x0, y0, z0, x1, y1, z1], "space": "world"}
        ]
    }

``voxel`` boxes are inclusive voxel indices of the input file as stored (what nibabel's array or a viewer's IJK
shows); ``world`` boxes are RAS millimetres (the NIfTI/nibabel convention). For propagation a box spans one slice
along the slicing axis (its key slice).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from samparser_monai.engines.slice_inference import SlicePrompts, _unwrap
from samparser_monai.transforms.prompts import mask_to_box

__all__ = ["box_to_oriented_voxels", "json_box_prompts", "load_box_json", "plane_box", "propagate_box"]


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
                and entry.get("space") in ("voxel", "world")
            )
            if not ok or not isinstance(entry.get("box"), list) or len(entry["box"]) != 6:
                raise ValueError(
                    f"Box file '{path}', case '{case}': each prompt needs an integer 'label', a 6-number 'box' "
                    f"[x0, y0, z0, x1, y1, z1] and 'space' 'voxel' or 'world'; got {entry!r}."
                )
    return {str(k): list(v) if isinstance(v, list) else [v] for k, v in content.items()}


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


def json_box_prompts(
    entries: Sequence[Mapping],
    original_affine: np.ndarray,
    oriented_affine: np.ndarray,
    shape: Sequence[int],
    axis: int = 2,
) -> SlicePrompts:
    """Slice prompts from JSON 3D boxes: each box prompts every slice it spans, clipped to the volume."""
    prompts: SlicePrompts = {}
    for entry in entries:
        bounds = box_to_oriented_voxels(entry["box"], entry["space"], original_affine, oriented_affine)
        bounds = np.clip(np.round(bounds, 3), 0, np.asarray(shape, np.float64) - 1)
        box = plane_box(bounds, axis)
        for s in range(int(np.ceil(bounds[0, axis])), int(np.floor(bounds[1, axis])) + 1):
            prompts.setdefault(s, []).append((int(entry["label"]), box.clone()))
    return prompts


@torch.no_grad()
def propagate_box(
    network: nn.Module,
    image: torch.Tensor,
    key_slice: int,
    box: torch.Tensor,
    axis: int = 2,
    min_pixels: int = 1,
    margin: float = 0.1,
) -> torch.Tensor:
    """Segment one object from a single box on its key slice, carried slice by slice in both directions.

    Each next slice is prompted with the tight box of the previous slice's mask, grown by ``margin`` of its size;
    a direction stops when the mask holds fewer than ``min_pixels`` voxels or the volume ends. Both directions run
    in the same encoder batch.

    Returns:
        ``X x Y x Z`` boolean mask of the object.
    """
    model = _unwrap(network)
    device = next(model.parameters()).device
    image = torch.as_tensor(image)
    n_slices = image.shape[axis + 1]
    out = torch.zeros(image.shape[1:], dtype=torch.bool)
    fronts = [(key_slice, box.float(), 0)]  # (slice, box, direction); 0 = the key slice itself
    while fronts:
        planes = torch.stack([image.select(axis + 1, s) for s, _, _ in fronts]).to(device=device, dtype=torch.float32)
        boxes = torch.stack([b for _, b, _ in fronts])[:, None].to(device)
        masks = model.decode(model.encode(planes), boxes, planes.shape[-2:])[:, 0].cpu() > 0
        next_fronts = []
        for (s, _, direction), mask in zip(fronts, masks):
            if int(mask.sum()) < min_pixels:
                continue
            out.select(axis, s).copy_(mask)
            tight = mask_to_box(mask)
            grow = margin * torch.stack([tight[2] - tight[0], tight[3] - tight[1]]).repeat(2) + 1.0
            grown = torch.stack([tight[0] - grow[0], tight[1] - grow[1], tight[2] + grow[2], tight[3] + grow[3]])
            limits = torch.tensor([mask.shape[1] - 1, mask.shape[0] - 1] * 2, dtype=torch.float32)
            grown = torch.minimum(grown.clamp_min(0), limits)
            for step in (-1, 1) if direction == 0 else (direction,):
                if 0 <= s + step < n_slices:
                    next_fronts.append((s + step, grown, step))
        fronts = next_fronts
    return out
