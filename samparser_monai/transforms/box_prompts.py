# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Box prompts from label maps: tight boxes, jittered boxes, and :class:`BoxPromptd` for dictionary pipelines.

Boxes are ``(x0, y0, x1, y1)`` in pixel coordinates with x along the last tensor axis (columns) and y along the
second-to-last (rows), as :class:`~samparser_monai.networks.sam.SamParser` takes them. Tight boxes use the inclusive
maximum indices (the SAM/MedSAM convention): a single pixel at row 3, column 5 has the box ``(5, 3, 5, 3)``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Randomizable
from monai.utils import convert_to_numpy, optional_import

ndimage, _has_scipy = optional_import("scipy.ndimage")

__all__ = ["BOX_MODES", "USER_BOXES", "BoxPromptd", "UserBoxPromptd", "grow_box", "jitter_box", "mask_to_box"]

#: The ``per`` modes of :class:`BoxPromptd`.
BOX_MODES = ("mask", "label", "component")

#: Boxes :class:`UserBoxPromptd` draws from: what the 3D prompt engine gives the decoder at inference.
USER_BOXES = ("tight", "neighbour", "roi")

_RandomSource = np.random.RandomState | np.random.Generator | torch.Generator


def _as_2d(label: NdarrayOrTensor, name: str) -> np.ndarray:
    """A ``H x W`` or ``1 x H x W`` array as a ``H x W`` numpy array."""
    arr = convert_to_numpy(label)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be H x W or 1 x H x W (2D, channel first), got shape {tuple(arr.shape)}.")
    return arr


def _tight_box(mask: np.ndarray) -> list[float] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1]), float(rows[-1])]


def mask_to_box(mask: NdarrayOrTensor) -> torch.Tensor | None:
    """The tight box ``(x0, y0, x1, y1)`` (inclusive max indices, float32) of a 2D mask; None when it is empty.

    Args:
        mask: boolean or binary mask, ``H x W`` or ``1 x H x W`` (numpy or torch); non-zero voxels are foreground.
    """
    box = _tight_box(_as_2d(mask, "mask") != 0)
    return None if box is None else torch.tensor(box, dtype=torch.float32)


def grow_box(
    box: torch.Tensor,
    size: Sequence[int],
    margin: float = 0.0,
    pad: float = 0.0,
    clip: NdarrayOrTensor | Sequence[float] | None = None,
) -> torch.Tensor:
    """A tight box ``(x0, y0, x1, y1)`` grown by ``margin`` (a fraction of its size) plus ``pad`` pixels a side.

    Negative values shrink it, down to its centre point (never inverted). The result stays inside an image of
    ``size`` ``(H, W)`` and inside ``clip`` (a box), when given. This is how propagation prompts the next slice from
    a mask's box (:class:`~samparser_monai.engines.PromptEngine`), and how training imitates it.
    """
    tight = torch.as_tensor(box, dtype=torch.float32)
    grow = margin * torch.stack([tight[2] - tight[0], tight[3] - tight[1]]).repeat(2) + pad
    grown = torch.cat([tight[:2] - grow[:2], tight[2:] + grow[2:]])
    centre = (tight[:2] + tight[2:]) / 2
    grown = torch.cat([torch.minimum(grown[:2], centre), torch.maximum(grown[2:], centre)])
    low = torch.zeros(2)
    high = torch.tensor([size[1] - 1, size[0] - 1], dtype=torch.float32)
    if clip is not None:
        clip = torch.as_tensor(clip, dtype=torch.float32)
        low, high = torch.maximum(low, clip[:2]), torch.minimum(high, clip[2:])
    return torch.cat([torch.maximum(grown[:2], low), torch.minimum(grown[2:], high)])


def _uniform(rng: _RandomSource | None, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Uniform samples in ``[low, high]`` (elementwise, float64) from a numpy or torch random source."""
    if isinstance(rng, torch.Generator):
        u = torch.rand(low.shape, generator=rng, dtype=torch.float64)
    else:
        source = np.random if rng is None else rng
        u = torch.as_tensor(source.uniform(0.0, 1.0, size=tuple(low.shape)), dtype=torch.float64)
    return low + (high - low) * u


def jitter_box(
    box: NdarrayOrTensor | Sequence[float],
    jitter: float,
    mode: str = "fraction",
    image_size: Sequence[int] | None = None,
    rng: _RandomSource | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Move each box coordinate independently by uniform noise, then clip to the image and keep the box ordered.

    Args:
        box: ``(x0, y0, x1, y1)`` or ``N x 4`` boxes in pixels.
        jitter: noise bound ``j`` >= 0: each coordinate moves by ``U[-j, j]`` pixels (``mode="pixels"``) or by
            ``U[-j * w, j * w]`` for x and ``U[-j * h, j * h]`` for y coordinates (``mode="fraction"``; ``w = x1 -
            x0``, ``h = y1 - y0`` of each box).
        mode: ``"fraction"`` (of the box size) or ``"pixels"``.
        image_size: ``(H, W)``; when given, the coordinates are clipped to ``[0, W - 1] x [0, H - 1]``.
        rng: random source: a ``numpy.random.RandomState`` (e.g. a MONAI transform's ``self.R``), a
            ``numpy.random.Generator`` or a ``torch.Generator``; None uses numpy's global state.
        generator: a ``torch.Generator``, an alias of ``rng`` for torch code (give one of the two).

    Returns:
        float32 boxes of the shape of ``box`` with ``x0 <= x1`` and ``y0 <= y1``; ``box`` unchanged (as float32)
        when ``jitter`` is 0.
    """
    if mode not in ("fraction", "pixels"):
        raise ValueError(f"Unknown jitter mode {mode!r}; use 'fraction' or 'pixels'.")
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}.")
    if rng is not None and generator is not None:
        raise ValueError("Give the random source as rng or as generator, not both.")
    rng = generator if rng is None else rng
    boxes = torch.as_tensor(convert_to_numpy(box, wrap_sequence=True), dtype=torch.float64)
    if boxes.shape[-1:] != (4,) or boxes.ndim not in (1, 2):
        raise ValueError(f"box must be (x0, y0, x1, y1) or N x 4, got shape {tuple(boxes.shape)}.")
    if jitter == 0 or boxes.numel() == 0:
        return boxes.to(torch.float32)
    flat = boxes.reshape(-1, 4)
    if mode == "pixels":
        bound = torch.full_like(flat, float(jitter))
    else:
        size = (flat[:, 2:] - flat[:, :2]).abs()  # (w, h)
        bound = float(jitter) * torch.cat([size, size], dim=1)
    out = flat + _uniform(rng, -bound, bound)
    if image_size is not None:
        h, w = int(image_size[0]), int(image_size[1])
        out[:, 0::2] = out[:, 0::2].clamp(0, max(w - 1, 0))
        out[:, 1::2] = out[:, 1::2].clamp(0, max(h - 1, 0))
    lo, hi = torch.minimum(out[:, :2], out[:, 2:]), torch.maximum(out[:, :2], out[:, 2:])
    return torch.cat([lo, hi], dim=1).reshape(boxes.shape).to(torch.float32)


class BoxPromptd(Randomizable, MapTransform):
    """Box prompts ``(x0, y0, x1, y1)`` from a 2D label map, optionally jittered, for training and inference.

    Args:
        keys: the key of the label map, ``1 x H x W`` (or ``H x W``); one key only.
        box_key: output key of the boxes, a float32 tensor ``N x 4``.
        box_label_key: output key of the label id of each box, an int64 tensor ``N``.
        jitter: box jitter bound (see :func:`jitter_box`); 0 gives tight boxes.
        jitter_mode: ``"fraction"`` (of the box width/height) or ``"pixels"``.
        per: ``"mask"``: one box around all foreground voxels, box label 1 (training on a binary target);
            ``"label"``: one box per label id; ``"component"``: one box per 8-connected component of each label id
            (needs scipy).
        labels: the label ids to box; default all non-zero ids present. With ``per="mask"`` the foreground is the
            voxels whose value is in ``labels``. Ids that are absent give no box.
        max_boxes: keep at most this many boxes, the largest by box area (ties: the earlier box), in their
            original order (ascending label id, then component order).
        empty_box: what an empty target gives: ``"none"``: no box (``0 x 4`` and an empty ``box_label``);
            ``"random"``: one random box inside the image, with sides drawn between 5% and 50% of the image's and
            box label 0 (background: its target is an empty mask).
        allow_missing_keys: don't raise an exception if the label key is missing.

    Boxes are ordered by label id, then by component (raster order of their first voxel). Jitter and random boxes
    draw from ``self.R``, so ``set_random_state(seed)`` makes the output reproducible. The number of boxes varies
    between items unless ``per="mask"`` with ``empty_box="random"`` (always one box), which batches with the default
    collate.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        box_key: str = "box",
        box_label_key: str = "box_label",
        jitter: float = 0.0,
        jitter_mode: str = "fraction",
        per: str = "mask",
        labels: Sequence[int] | None = None,
        max_boxes: int | None = None,
        empty_box: str = "none",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"BoxPromptd takes one label key, got {list(self.keys)}.")
        if per not in BOX_MODES:
            raise ValueError(f"Unknown per={per!r}; use one of {', '.join(BOX_MODES)}.")
        if jitter_mode not in ("fraction", "pixels"):
            raise ValueError(f"Unknown jitter_mode {jitter_mode!r}; use 'fraction' or 'pixels'.")
        if jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {jitter}.")
        if empty_box not in ("none", "random"):
            raise ValueError(f"Unknown empty_box {empty_box!r}; use 'none' or 'random'.")
        if max_boxes is not None and max_boxes < 1:
            raise ValueError(f"max_boxes must be None or >= 1, got {max_boxes}.")
        if per == "component" and not _has_scipy:
            raise ImportError("per='component' needs scipy for connected components; install it with pip.")
        self.box_key, self.box_label_key = box_key, box_label_key
        self.jitter, self.jitter_mode = float(jitter), jitter_mode
        self.per, self.empty_box = per, empty_box
        self.labels = None if labels is None else sorted({int(i) for i in labels})
        self.max_boxes = max_boxes

    def randomize(self, data: tuple[torch.Tensor, Sequence[int]]) -> torch.Tensor:
        """Draw the prompts from ``self.R``: jitter the tight boxes ``data[0]`` (``N x 4``) of an image of size
        ``data[1]`` (``(H, W)``), or draw one random box when there is none and ``empty_box="random"``."""
        boxes, (h, w) = data
        if boxes.shape[0] == 0:
            return self._random_box(h, w) if self.empty_box == "random" else boxes
        return jitter_box(boxes, self.jitter, self.jitter_mode, image_size=(h, w), rng=self.R)

    def _random_box(self, h: int, w: int) -> torch.Tensor:
        bw = min(self.R.uniform(0.05, 0.5) * w, w - 1.0)
        bh = min(self.R.uniform(0.05, 0.5) * h, h - 1.0)
        x0 = self.R.uniform(0.0, max(w - 1.0 - bw, 0.0))
        y0 = self.R.uniform(0.0, max(h - 1.0 - bh, 0.0))
        return torch.tensor([[x0, y0, x0 + max(bw, 0.0), y0 + max(bh, 0.0)]], dtype=torch.float32)

    def _tight_boxes(self, label: np.ndarray) -> tuple[list[list[float]], list[int]]:
        ids = self.labels if self.labels is not None else np.unique(label[label != 0]).tolist()
        boxes: list[list[float]] = []
        box_labels: list[int] = []
        if self.per == "mask":
            box = _tight_box(np.isin(label, ids) if self.labels is not None else label != 0)
            if box is not None:
                boxes, box_labels = [box], [1]
            return boxes, box_labels
        for i in ids:
            mask = label == i
            if self.per == "label":
                parts = [mask]
            else:
                components, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
                parts = [components == c for c in range(1, n + 1)]
            for part in parts:
                box = _tight_box(part)
                if box is not None:
                    boxes.append(box)
                    box_labels.append(int(i))
        return boxes, box_labels

    def _keep_largest(self, boxes: list[list[float]], box_labels: list[int]) -> tuple[list, list]:
        if self.max_boxes is None or len(boxes) <= self.max_boxes:
            return boxes, box_labels
        areas = [(b[2] - b[0] + 1) * (b[3] - b[1] + 1) for b in boxes]
        keep = sorted(sorted(range(len(boxes)), key=lambda k: -areas[k])[: self.max_boxes])
        return [boxes[k] for k in keep], [box_labels[k] for k in keep]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = _as_2d(d[key], f"'{key}'")
            boxes, box_labels = self._keep_largest(*self._tight_boxes(label))
            tight = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            prompts = self.randomize((tight, label.shape))
            if len(boxes) == 0 and prompts.shape[0] == 1:
                box_labels = [0]  # a random box on an empty target
            d[self.box_key] = prompts.to(torch.float32)
            d[self.box_label_key] = torch.tensor(box_labels, dtype=torch.int64)
        return d


class UserBoxPromptd(Randomizable, MapTransform):
    """Replace a training sample's box by one like those users' prompts give the decoder at inference, at random.

    The 3D prompt engine prompts a slice with the box of the previous slice's mask (``key``, ``roi``, ``points``
    propagation), and an ROI projects one box on every slice it spans, too large on its end slices; a model trained
    only on tight (jittered) boxes never sees either. Per sample, with the probabilities given, the box becomes:

    - ``"tight"``: the box :class:`BoxPromptd` drew (kept as is);
    - ``"neighbour"``: the tight box of the same label on a neighbouring slice (a random side that holds it; the
      sample's own box when neither does), grown by ``margin`` (a fraction of its size), as propagation gives it;
    - ``"roi"``: the label's 3D bounding box projected on the slice, grown by ``pad`` pixels, as a 3D ROI gives it.

    Needs the ``neighbours`` and ``roi_box`` keys of :class:`~samparser_monai.data.SliceDataset` (``context=True``)
    and removes them; a sample without them (background) keeps its box. Place it after :class:`BoxPromptd` and before
    the resize.

    Args:
        box_key: the key of the boxes (``N x 4``; the first box is replaced).
        probabilities: weight of each of :data:`USER_BOXES` (normalised).
        margin: growth of a neighbour box, as a fraction of its width and height on each side.
        pad: growth of the ROI box, in pixels on each side.
        keep_context: leave the ``neighbours`` and ``roi_box`` keys for a later transform (which must remove them:
            :class:`~samparser_monai.transforms.MaskPromptd`).
    """

    def __init__(
        self,
        box_key: str = "box",
        probabilities: Mapping[str, float] | None = None,
        margin: float = 0.0,
        pad: float = 1.0,
        keep_context: bool = False,
    ) -> None:
        super().__init__(keys=box_key)
        weights = dict(probabilities or dict.fromkeys(USER_BOXES, 1.0))
        unknown = sorted(set(weights) - set(USER_BOXES))
        if unknown or not weights or min(weights.values()) < 0 or sum(weights.values()) <= 0:
            raise ValueError(f"probabilities must weigh {list(USER_BOXES)} with non-negative numbers, got {weights}.")
        total = float(sum(weights.values()))
        self.names = list(weights)
        self.weights = [weights[n] / total for n in self.names]
        self.box_key, self.margin, self.pad = box_key, float(margin), float(pad)
        self.keep_context = keep_context

    def randomize(self, data: Any = None) -> tuple[str, int]:
        """Draw the kind of box and the side of the neighbour."""
        return str(self.R.choice(self.names, p=self.weights)), int(self.R.randint(2))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        take = d.get if self.keep_context else d.pop
        neighbours, roi = take("neighbours", None), take("roi_box", None)
        kind, side = self.randomize()
        if neighbours is None or roi is None or d[self.box_key].shape[0] == 0 or kind == "tight":
            return d
        h, w = neighbours.shape[-2:]
        if kind == "roi":
            box = torch.as_tensor(roi, dtype=torch.float32) + torch.tensor([-self.pad, -self.pad, self.pad, self.pad])
        else:
            sides = [k for k in (side, 1 - side) if bool(neighbours[k].any())]
            found = mask_to_box(neighbours[sides[0]]) if sides else None
            if found is None:
                return d
            size = torch.stack([found[2] - found[0] + 1, found[3] - found[1] + 1]).float()
            box = found.float() + torch.cat([-size, size]) * self.margin
        box = torch.stack(
            [box[0].clamp(0, w - 1), box[1].clamp(0, h - 1), box[2].clamp(0, w - 1), box[3].clamp(0, h - 1)]
        )
        boxes = d[self.box_key].clone()
        boxes[0] = box
        d[self.box_key] = boxes
        return d
