# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Prompts as users give them, simulated from a reference label map, to evaluate with them instead of oracle boxes.

Protocols, per label present in the reference:

- ``label``: a tight box from the reference on every slice (oracle; no user has it);
- ``roi_boxes``: the label's 3D bounding box + 1 voxel, its in-plane box on every slice it spans (no propagation);
- ``roi``: the same 3D box through the :class:`~samparser_monai.engines.prompt_engine.PromptEngine`;
- ``key``: a tight box on the label's largest slice, propagated with the stop rule;
- ``click1``: one positive click at the most interior point of the largest slice, propagated;
- ``click3``: then two corrective clicks, each at the most interior voxel of the largest error region of the
  previous result (positive where the object was missed, negative where it leaked).

:class:`SimulatedPromptInferer` runs one of them in a MONAI evaluator (``evaluate.json``'s ``eval_prompt``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from scipy import ndimage
from torch import nn

from samparser_monai.engines.prompt_engine import ObjectPrompt, PromptEngine
from samparser_monai.engines.slice_inference import label_box_prompts, predict_volume
from samparser_monai.engines.stop_rule import StopRule
from samparser_monai.transforms.box_prompts import mask_to_box

__all__ = ["PROTOCOLS", "SimulatedPromptInferer", "SimulatedRun", "interior_point", "simulate"]

PROTOCOLS = ("label", "roi_boxes", "roi", "key", "click1", "click3")


@dataclass
class SimulatedRun:
    """Prediction of one volume under one protocol: the label map, slices encoded, and the engine's trace rows."""

    labels: torch.Tensor
    encoder_passes: int
    trace: list[dict]


def interior_point(mask: np.ndarray) -> tuple[int, ...]:
    """The voxel of ``mask`` farthest from its border (ties: the first in index order)."""
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[tuple(slice(1, -1) for _ in mask.shape)]
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(distance)), mask.shape))


def _plane_axes(axis: int) -> tuple[int, int]:
    rows, cols = [a for a in range(3) if a != axis]
    return rows, cols


def _roi(mask: np.ndarray, axis: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The 3D bounding box + 1 voxel: in-plane box ``(x0, y0, x1, y1)`` and z-range."""
    coords = np.nonzero(mask)
    low = [max(int(c.min()) - 1, 0) for c in coords]
    high = [min(int(c.max()) + 1, n - 1) for c, n in zip(coords, mask.shape)]
    rows, cols = _plane_axes(axis)
    return torch.tensor([low[cols], low[rows], high[cols], high[rows]], dtype=torch.float32), (low[axis], high[axis])


def _largest_slice(mask: np.ndarray, axis: int) -> int:
    return int(np.argmax(mask.sum(axis=tuple(a for a in range(3) if a != axis))))


def _click(point: Sequence[int], axis: int) -> list[float]:
    """``(x, y, slice)`` of a voxel index."""
    rows, cols = _plane_axes(axis)
    return [float(point[cols]), float(point[rows]), float(point[axis])]


def _corrective_click(prediction: np.ndarray, reference: np.ndarray, axis: int) -> tuple[list[float], float] | None:
    """A click at the most interior voxel of the largest error region: 1.0 in a miss, 0.0 in a leak."""
    error = prediction != reference
    if not error.any():
        return None
    regions, count = ndimage.label(error)
    sizes = ndimage.sum(error, regions, range(1, count + 1))
    point = interior_point(regions == int(np.argmax(sizes)) + 1)
    return _click(point, axis), float(reference[point])


def _object(protocol: str, mask: np.ndarray, label: int, axis: int, clicks) -> ObjectPrompt:
    key = _largest_slice(mask, axis)
    if protocol == "roi":
        box, z_range = _roi(mask, axis)
        return ObjectPrompt(label, (z_range[0] + z_range[1]) // 2, box, z_range=z_range, clip=box)
    if protocol == "key":
        return ObjectPrompt(label, key, mask_to_box(np.take(mask, key, axis=axis)))
    points, point_labels = clicks
    return ObjectPrompt(label, key, None, torch.tensor(points), torch.tensor(point_labels, dtype=torch.float32))


@torch.no_grad()
def simulate(
    protocol: str,
    network: nn.Module,
    image: torch.Tensor,
    reference: np.ndarray | torch.Tensor,
    axis: int = 2,
    batch_size: int = 8,
    rule: StopRule | None = None,
    labels: Sequence[int] | None = None,
    embeddings: dict[int, torch.Tensor] | None = None,
) -> SimulatedRun:
    """Segment ``image`` (``C x X x Y x Z``) from prompts simulated from ``reference`` (``X x Y x Z``).

    ``embeddings`` (slice index -> image embedding of *this* image, optional): kept by the caller, so that several
    protocols on one image encode each slice once. ``encoder_passes`` counts the slices the protocol used either way:
    what it costs alone.

    Raises:
        ValueError: an unknown protocol.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown prompt protocol {protocol!r}; use one of {list(PROTOCOLS)}.")
    reference = np.asarray(reference.cpu() if isinstance(reference, torch.Tensor) else reference).astype(np.int64)
    ids = [int(v) for v in labels] if labels is not None else [int(v) for v in np.unique(reference) if v]
    ids = [i for i in ids if (reference == i).any()]
    if protocol == "label":
        prompts = label_box_prompts(torch.as_tensor(reference), axis, ids)
        return SimulatedRun(predict_volume(network, image, prompts, axis, batch_size, embeddings), len(prompts), [])
    if protocol == "roi_boxes":
        boxes: dict[int, list] = {}
        for label in ids:
            box, (z0, z1) = _roi(reference == label, axis)
            for s in range(z0, z1 + 1):
                boxes.setdefault(s, []).append((label, box))
        return SimulatedRun(predict_volume(network, image, boxes, axis, batch_size, embeddings), len(boxes), [])
    engine = PromptEngine(network, axis, batch_size, rule)
    clicks = {}
    for label in ids:
        mask = reference == label
        key = _largest_slice(mask, axis)
        point = list(interior_point(np.take(mask, key, axis=axis)))
        point.insert(axis, key)
        clicks[label] = ([_click(point, axis)], [1.0])
    rounds = 3 if protocol == "click3" else 1
    embeddings = {} if embeddings is None else embeddings  # later clicks reuse the encoded slices, as an app would
    used: set[int] = set()  # every slice a front reached (each was encoded, or taken from ``embeddings``)
    trace, result = [], None
    for round_ in range(rounds):
        objects = [_object(protocol, reference == label, label, axis, clicks[label]) for label in ids]
        result = engine.segment(image, objects, embeddings)
        used.update(row["slice"] for rows in result.trace for row in rows)
        trace = [dict(row, label=obj.label) for obj, rows in zip(objects, result.trace) for row in rows]
        if round_ + 1 < rounds:
            prediction = result.labels.numpy()
            for label in ids:
                correction = _corrective_click(prediction == label, reference == label, axis)
                if correction is not None:
                    clicks[label][0].append(correction[0])
                    clicks[label][1].append(correction[1])
    return SimulatedRun(result.labels, len(used), trace)


class SimulatedPromptInferer(Inferer):
    """MONAI inferer that evaluates with prompts simulated from the reference label (see the module docstring).

    Called by ``SupervisedEvaluator`` as ``inferer(image, network, label)`` (``PrepareBatchExtraInput(extra_keys=
    "label")``); returns a ``B x 1 x X x Y x Z`` label map with the input's geometry.

    Args:
        protocol: one of :data:`PROTOCOLS`.
        axis: spatial axis of the slices.
        batch_size: slices per encoder pass.
        rule: stop rule of the engine's propagation (default :class:`StopRule`).
    """

    def __init__(self, protocol: str = "label", axis: int = 2, batch_size: int = 8, rule: StopRule | None = None):
        super().__init__()
        if protocol not in PROTOCOLS:
            raise ValueError(f"Unknown eval_prompt {protocol!r}; use one of {list(PROTOCOLS)}.")
        self.protocol, self.axis, self.batch_size, self.rule = protocol, axis, batch_size, rule

    def __call__(self, inputs: torch.Tensor, network: nn.Module, label: torch.Tensor | None = None) -> torch.Tensor:
        """Predict every volume of the batch; the output is on the device of ``inputs``."""
        if label is None:
            raise ValueError("SimulatedPromptInferer needs the reference label: PrepareBatchExtraInput('label').")
        outputs = []
        for image, reference in zip(inputs, label):
            run = simulate(
                self.protocol,
                network,
                image,
                reference[0].detach().round().long(),
                self.axis,
                self.batch_size,
                self.rule,
            )
            outputs.append(run.labels[None])
        out = torch.stack(outputs).to(inputs.device)
        if isinstance(inputs, MetaTensor):  # keep the input's geometry and history, so Invertd can map it back
            out = MetaTensor(out, meta=inputs.meta, applied_operations=inputs.applied_operations)
            out.is_batch = inputs.is_batch
        return out
