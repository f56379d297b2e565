# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Mask prompts for training: :class:`MaskPromptd` prompts some samples as propagation prompts a slice.

The 3D prompt engine carries an object from slice to slice with the box of the previous slice's mask. A box alone
loses the shape: on a curved structure (the posterior hippocampus) the masks fade within a few slices of the start
(docs/benchmarks.md, "Mask prompts"). SAM also takes a mask as a dense prompt; trained on a share of samples
prompted with a neighbouring slice's mask and that mask's box, the decoder learns to carry the shape along, and the
engine then passes the previous slice's mask with the box (``StopRule.mask_prompt``). A mask prompt is ``N x H x W``
on the sample's pixel grid: 1 object, 0 background, -1 everywhere for "no mask".
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from monai.transforms import MapTransform, Randomizable

from samparser_monai.transforms.box_prompts import grow_box, mask_to_box

__all__ = ["NO_MASK", "MaskPromptd", "morph_mask", "shift_mask"]

#: the value that fills a mask prompt meaning "no mask"
NO_MASK = -1.0


class MaskPromptd(Randomizable, MapTransform):
    """With probability ``probability``, prompt a sample with a neighbouring slice's mask and that mask's box.

    Every sample gets ``mask_prompt`` (``N x H x W``, like its label), so samples batch with the default collate: the
    neighbour's target for a prompted sample (its box then becomes that target's tight box grown by ``margin`` and
    ``pad``, as :class:`~samparser_monai.engines.PromptEngine` makes a propagated box), :data:`NO_MASK` elsewhere.
    A side is drawn at random among the neighbours that hold the label; a sample with none (the object's end slices,
    background samples) keeps its box and gets no mask.

    Needs the ``neighbours`` key of :class:`~samparser_monai.data.SliceDataset` (``context=True``) and removes it
    and ``roi_box``. Place it after :class:`~samparser_monai.transforms.BoxPromptd` (and any
    :class:`~samparser_monai.transforms.UserBoxPromptd`, with ``keep_context=True``) and before the resize, which
    must resize ``mask_key`` too (nearest).

    Args:
        keys: the key of the label map (``1 x H x W``): the shape of the "no mask" fill.
        box_key: the key of the boxes (``N x 4``; one box per sample).
        mask_key: output key of the mask prompt.
        probability: share of samples prompted with a neighbour's mask.
        margin: growth of the neighbour's box, a fraction of its size a side (the engine's ``StopRule.margin``).
        pad: then pixels a side, negative to shrink (the engine's pad for a fine-tuned model: -1).
        perturb: the neighbour's mask is grown or shrunk by up to this many pixels (drawn per sample) before it
            becomes the prompt: at inference the previous mask is the model's own, a boundary pixel or two off, and
            a decoder that sees exact neighbours learns to copy the prompt instead of reading the image.
        shift: the neighbour's mask is then moved by up to this many pixels along each in-plane axis (drawn per
            sample; 0: not moved, and nothing more is drawn, so a run without it draws what it drew before): a
            propagated mask that has drifted off a curved structure keeps its size, and the shift was meant to teach
            the decoder to put it back where the image shows the object. At 1 pixel it did worse on the posterior
            hippocampus (docs/benchmarks.md, "Shifted mask prompts"), so the bundle keeps 0.
    """

    def __init__(
        self,
        keys: str = "label",
        box_key: str = "box",
        mask_key: str = "mask_prompt",
        probability: float = 0.5,
        margin: float = 0.0,
        pad: float = -1.0,
        perturb: int = 2,
        shift: int = 0,
    ) -> None:
        super().__init__(keys)
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {probability}.")
        if perturb < 0:
            raise ValueError(f"perturb must be >= 0 pixels, got {perturb}.")
        if shift < 0:
            raise ValueError(f"shift must be >= 0 pixels, got {shift}.")
        self.shift = int(shift)
        self.box_key, self.mask_key = box_key, mask_key
        self.probability, self.margin, self.pad, self.perturb = float(probability), float(margin), float(pad), perturb

    def randomize(self, data: Any = None) -> tuple[bool, int, int, tuple[int, int]]:
        """Draw whether the sample is prompted with a mask, which neighbour is tried first, the perturbation
        (pixels: positive grows the mask, negative shrinks it) and the shift (rows, columns)."""
        prompted, side = bool(self.R.random_sample() < self.probability), int(self.R.randint(2))
        change = int(self.R.randint(-self.perturb, self.perturb + 1))
        if not self.shift:
            return prompted, side, change, (0, 0)
        rows, cols = self.R.randint(-self.shift, self.shift + 1, size=2)
        return prompted, side, change, (int(rows), int(cols))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        neighbours = d.pop("neighbours", None)
        d.pop("roi_box", None)
        label = torch.as_tensor(d[self.first_key(d)])
        boxes = torch.as_tensor(d[self.box_key], dtype=torch.float32).reshape(-1, 4).clone()
        if boxes.shape[0] > 1:
            raise ValueError(f"MaskPromptd takes one box per sample (BoxPromptd per='mask'), got {boxes.shape[0]}.")
        prompt = torch.full((max(boxes.shape[0], 1), *label.shape[-2:]), NO_MASK)
        prompted, side, change, offset = self.randomize()
        if prompted and neighbours is not None and boxes.shape[0] == 1:
            sides = [k for k in (side, 1 - side) if bool(neighbours[k].any())]
            if sides:
                mask = shift_mask(morph_mask(torch.as_tensor(neighbours[sides[0]]) > 0, change), *offset)
                boxes[0] = grow_box(mask_to_box(mask), mask.shape, self.margin, self.pad)
                prompt[0] = mask.float()
        d[self.box_key], d[self.mask_key] = boxes, prompt
        return d


def morph_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """``mask`` (``H x W`` bool) dilated (``pixels`` > 0) or eroded (< 0) by a square of that radius; an erosion
    that would empty it leaves it as it is. Training perturbs mask prompts with it, and propagation shrinks the
    previous mask with it (``StopRule.mask_shrink``)."""
    if pixels == 0:
        return mask
    size = 2 * abs(pixels) + 1
    x = mask.float()[None, None]
    out = (
        F.max_pool2d(x, size, stride=1, padding=abs(pixels)) if pixels > 0 else -F.max_pool2d(-x, size, 1, abs(pixels))
    )
    out = out[0, 0] > 0.5
    return out if bool(out.any()) else mask


def shift_mask(mask: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``mask`` (``H x W`` bool) moved by ``rows`` down and ``cols`` right, what leaves the slice dropped (no wrap);
    a shift that would empty it leaves it as it is."""
    if not rows and not cols:
        return mask
    out = torch.zeros_like(mask)
    height, width = mask.shape[-2:]
    if abs(rows) < height and abs(cols) < width:
        src_r, dst_r = slice(max(-rows, 0), height - max(rows, 0)), slice(max(rows, 0), height - max(-rows, 0))
        src_c, dst_c = slice(max(-cols, 0), width - max(cols, 0)), slice(max(cols, 0), width - max(-cols, 0))
        out[..., dst_r, dst_c] = mask[..., src_r, src_c]
    return out if bool(out.any()) else mask
