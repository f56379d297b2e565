# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Slice-wise 3D prediction with box prompts: each slice is encoded once, all its boxes decoded in one pass,
slices go through the encoder in batches, and the masks are pasted back into a 3D label map."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from torch import nn

from samparser_monai.engines.embedding_cache import encode_slices
from samparser_monai.networks.param_groups import unwrap_model
from samparser_monai.networks.sam import plain_tensor
from samparser_monai.transforms.box_prompts import jitter_box, mask_to_box

__all__ = ["LabelBoxSliceInferer", "SlicePrompts", "label_box_prompts", "predict_volume"]

#: Prompts of one volume: slice index -> list of (label id, box (x0, y0, x1, y1) in that slice's pixels).
SlicePrompts = dict[int, list[tuple[int, torch.Tensor]]]


def label_box_prompts(
    label: torch.Tensor | np.ndarray,
    axis: int = 2,
    labels: Sequence[int] | None = None,
    min_pixels: int = 1,
    jitter: float = 0.0,
    jitter_mode: str = "fraction",
    seed: int | None = 0,
) -> SlicePrompts:
    """Boxes derived from a reference label map (the evaluation protocol): one box per label per slice.

    Args:
        label: ``X x Y x Z`` (or ``1 x X x Y x Z``) integer label map.
        axis: spatial axis of the slices.
        labels: label ids to prompt (default: every non-zero id present).
        min_pixels: least voxels of a label on a slice for it to get a box.
        jitter: box jitter (see :func:`~samparser_monai.transforms.box_prompts.jitter_box`); 0 gives tight boxes.
        jitter_mode: ``"fraction"`` of the box size or ``"pixels"``.
        seed: seed of the jitter (same seed, same boxes).
    """
    label = torch.as_tensor(np.asarray(label) if isinstance(label, np.ndarray) else label)
    label = label[0] if label.ndim == 4 else label
    ids = [int(v) for v in labels] if labels is not None else [int(v) for v in torch.unique(label) if v != 0]
    rng = np.random.default_rng(seed)
    prompts: SlicePrompts = {}
    for s in range(label.shape[axis]):
        plane = label.select(axis, s)
        for label_id in ids:
            mask = plane == label_id
            if int(mask.sum()) < max(min_pixels, 1):
                continue
            box = mask_to_box(mask)
            if jitter:
                box = jitter_box(box, jitter, mode=jitter_mode, image_size=tuple(plane.shape), rng=rng)
            prompts.setdefault(s, []).append((label_id, box))
    return prompts


@torch.no_grad()
def predict_volume(
    network: nn.Module,
    image: torch.Tensor,
    prompts: Mapping[int, Sequence[tuple[int, torch.Tensor]]],
    axis: int = 2,
    batch_size: int = 8,
    embeddings: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """A 3D label map from box prompts on slices of ``image``.

    Args:
        network: a :class:`~samparser_monai.networks.SamParser` (or a DDP wrapper of one), in eval mode.
        image: ``C x X x Y x Z`` volume, intensities in [0, 1].
        prompts: boxes per slice, see :data:`SlicePrompts`.
        axis: spatial axis of the slices.
        batch_size: slices per encoder pass.
        embeddings: slice index -> image embedding of *this* image, kept by the caller across calls (slices already
            in it are not encoded again; those encoded here are added); ``None``: every prompted slice is encoded.

    Returns:
        ``X x Y x Z`` int64 label map: where several boxes of a slice claim a voxel, the highest logit wins; voxels
        no box claims (logit <= 0) are background.
    """
    model = unwrap_model(network)
    image = plain_tensor(torch.as_tensor(image))  # slices need no metadata
    device = next(model.parameters()).device
    out = torch.zeros(image.shape[1:], dtype=torch.int64)
    slices = sorted(s for s, boxes in prompts.items() if boxes)
    size = [d for i, d in enumerate(image.shape[1:]) if i != axis]
    cache: dict[int, torch.Tensor] = {} if embeddings is None else embeddings
    for start in range(0, len(slices), batch_size):
        chunk = slices[start : start + batch_size]
        n = max(len(prompts[s]) for s in chunk)
        boxes = torch.stack(
            [torch.stack([prompts[s][min(i, len(prompts[s]) - 1)][1] for i in range(n)]) for s in chunk]
        ).to(device=device, dtype=torch.float32)  # short lists repeat their last box; those outputs are ignored
        encode_slices(model, image, chunk, axis, cache, batch_size)
        emb = torch.stack([cache[s] for s in chunk]).to(device)
        if embeddings is None:
            cache.clear()  # nothing is kept across chunks unless the caller keeps it
        logits = model.decode(emb, boxes, size).float().cpu()
        for row, s in enumerate(chunk):
            ids = torch.tensor([label_id for label_id, _ in prompts[s]])
            slice_logits = logits[row, : len(ids)]
            best, index = slice_logits.max(dim=0)
            out.select(axis, s).copy_(torch.where(best > 0, ids[index], 0))
    return out


class LabelBoxSliceInferer(Inferer):
    """MONAI inferer for the evaluation protocol: boxes from the reference label, slice by slice, pasted into 3D.

    Called by ``SupervisedEvaluator`` as ``inferer(image, network, label)`` (pass the label with
    ``PrepareBatchExtraInput(extra_keys="label")``); returns a ``B x 1 x X x Y x Z`` label map.

    Args:
        axis: spatial axis of the slices.
        batch_size: slices per encoder pass.
        labels: label ids to prompt (default: every id present in each reference).
        min_pixels: least voxels of a label on a slice for it to get a box.
        jitter: box jitter, ``jitter_mode``: see :func:`label_box_prompts`.
        seed: seed of the jitter.
    """

    def __init__(
        self,
        axis: int = 2,
        batch_size: int = 8,
        labels: Sequence[int] | None = None,
        min_pixels: int = 1,
        jitter: float = 0.0,
        jitter_mode: str = "fraction",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.axis, self.batch_size, self.labels, self.min_pixels = axis, batch_size, labels, min_pixels
        self.jitter, self.jitter_mode, self.seed = jitter, jitter_mode, seed

    def __call__(self, inputs: torch.Tensor, network: nn.Module, label: torch.Tensor) -> torch.Tensor:
        """Predict every volume of the batch; the output is on the device of ``inputs``."""
        if label is None:
            raise ValueError(
                "LabelBoxSliceInferer needs the reference label: PrepareBatchExtraInput(extra_keys='label')."
            )
        outputs = []
        for image, reference in zip(inputs, label):
            prompts = label_box_prompts(
                reference.detach().cpu().round().long(),
                self.axis,
                self.labels,
                self.min_pixels,
                self.jitter,
                self.jitter_mode,
                self.seed,
            )
            outputs.append(predict_volume(network, image, prompts, self.axis, self.batch_size)[None])
        out = torch.stack(outputs).to(inputs.device)
        if isinstance(inputs, MetaTensor):  # keep the input's geometry and history, so Invertd can map it back
            out = MetaTensor(out, meta=inputs.meta, applied_operations=inputs.applied_operations)
            out.is_batch = inputs.is_batch
        return out
