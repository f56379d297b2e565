# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Click prompts for training: :class:`ClickPromptd` turns some samples' box into clicks, as users give them.

A model fine-tuned on boxes only answers a click with almost nothing (docs/benchmarks.md, "Clicks"), although the
3D prompt engine starts the ``points`` protocol from clicks and refines slices with corrective clicks. Training on a
share of click prompts keeps the decoder's answer to them. Points are ``(x, y)`` pixels (x along the last axis) of the
image as the network sees it; labels are 1 (a positive click), 0 (a negative one) and -1 (an unused slot).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable
from monai.utils import convert_to_numpy, optional_import

ndimage, _has_scipy = optional_import("scipy.ndimage")

__all__ = ["ClickPromptd", "NO_CLICK"]

#: the label of an unused click slot (SAM's "not a point")
NO_CLICK = -1.0


class ClickPromptd(Randomizable, MapTransform):
    """With probability ``probability``, prompt a training sample with clicks instead of (or besides) its box.

    Every sample gets ``points`` (``N x max_clicks x 2``) and ``point_labels`` (``N x max_clicks``, -1 where unused),
    so samples batch with the default collate whatever they drew. A clicked sample is, at random:

    - clicks only (the box row becomes NaN, which :meth:`~samparser_monai.networks.SamParser.forward` reads as "no
      box"): a positive click drawn towards the object's interior (where a user clicks first), and up to
      ``max_clicks - 1`` corrective clicks, as the ``points`` protocol's start slice gets them;
    - the box with 1 to ``max_clicks - 1`` corrective clicks (``keep_box_probability``), as a propagated slice that
      the user corrected gets them.

    A corrective click is positive (anywhere in the object) or negative (in the background near it: within the box
    grown by ``near`` of its size a side), half and half. Samples with an empty target (box label 0) are not clicked.
    Place it after the resize (:class:`~samparser_monai.transforms.ResizeLongestPadd`): clicks are drawn on the label
    the network sees.

    Args:
        keys: the key of the label map, ``1 x H x W``; one key only.
        box_key: the key of the boxes (``N x 4``, one box per sample: ``BoxPromptd(per="mask")``).
        box_label_key: the key of the box labels (0: a random box on an empty target).
        points_key: output key of the clicks.
        point_labels_key: output key of their labels.
        probability: share of samples prompted with clicks.
        max_clicks: click slots per sample (at least 1).
        keep_box_probability: share of clicked samples that keep their box.
        near: how far from the object a negative click may fall, as a fraction of the box size on each side.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        box_key: str = "box",
        box_label_key: str = "box_label",
        points_key: str = "points",
        point_labels_key: str = "point_labels",
        probability: float = 0.5,
        max_clicks: int = 3,
        keep_box_probability: float = 0.5,
        near: float = 0.25,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"ClickPromptd takes one label key, got {list(self.keys)}.")
        for name, value in (("probability", probability), ("keep_box_probability", keep_box_probability)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}.")
        if max_clicks < 1:
            raise ValueError(f"max_clicks must be at least 1, got {max_clicks}.")
        if near < 0:
            raise ValueError(f"near must be >= 0, got {near}.")
        self.box_key, self.box_label_key = box_key, box_label_key
        self.points_key, self.point_labels_key = points_key, point_labels_key
        self.probability, self.max_clicks = float(probability), int(max_clicks)
        self.keep_box_probability, self.near = float(keep_box_probability), float(near)

    def randomize(self, data: Any = None) -> tuple[bool, bool, int]:
        """Draw whether to click, whether the box stays, and how many corrective clicks follow."""
        clicked = self.R.uniform() < self.probability
        keep_box = self.R.uniform() < self.keep_box_probability
        low = 1 if keep_box else 0  # a box-kept sample has at least one click
        corrective = int(self.R.randint(low, self.max_clicks)) if self.max_clicks > low else low
        return bool(clicked), bool(keep_box), corrective

    def _pick(self, pixels: np.ndarray, weights: np.ndarray | None = None) -> list[float]:
        """One ``(x, y)`` of ``pixels`` (``K x 2`` row, column indices), optionally weighted."""
        p = None if weights is None else weights / weights.sum()
        row, col = pixels[int(self.R.choice(len(pixels), p=p))]
        return [float(col), float(row)]

    def _first_click(self, mask: np.ndarray) -> list[float]:
        pixels = np.argwhere(mask)
        if not _has_scipy:
            return self._pick(pixels)
        depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1][mask]
        return self._pick(pixels, depth.astype(np.float64) ** 2)

    def _corrective_click(self, mask: np.ndarray, box: np.ndarray) -> tuple[list[float], float] | None:
        if self.R.uniform() < 0.5:
            return self._pick(np.argwhere(mask)), 1.0
        h, w = mask.shape
        size = np.maximum(box[2:] - box[:2] + 1, 1) * self.near
        x0, y0 = np.floor(np.maximum(box[:2] - size, 0)).astype(int)
        x1, y1 = np.ceil(np.minimum(box[2:] + size, [w - 1, h - 1])).astype(int)
        near = np.zeros_like(mask)
        near[y0 : y1 + 1, x0 : x1 + 1] = True
        outside = np.argwhere(near & ~mask)
        return (self._pick(outside), 0.0) if len(outside) else None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.first_key(d)
        label = convert_to_numpy(d[key])
        label = label[0] if label.ndim == 3 else label
        boxes = torch.as_tensor(d[self.box_key], dtype=torch.float32).reshape(-1, 4).clone()
        if boxes.shape[0] > 1:
            raise ValueError(f"ClickPromptd takes one box per sample (BoxPromptd per='mask'), got {boxes.shape[0]}.")
        n = boxes.shape[0]
        points = torch.zeros(n, self.max_clicks, 2)
        labels = torch.full((n, self.max_clicks), NO_CLICK)
        clicked, keep_box, corrective = self.randomize()
        box_labels = d.get(self.box_label_key)
        foreground = n == 1 and (box_labels is None or int(torch.as_tensor(box_labels).reshape(-1)[0]) != 0)
        mask = label != 0
        if clicked and foreground and mask.any():
            clicks: list[tuple[list[float], float]] = [] if keep_box else [(self._first_click(mask), 1.0)]
            box = boxes[0].numpy().astype(np.float64)
            for _ in range(corrective):
                click = self._corrective_click(mask, box)
                if click is not None:
                    clicks.append(click)
            if clicks:
                for slot, (xy, value) in enumerate(clicks[: self.max_clicks]):
                    points[0, slot] = torch.tensor(xy)
                    labels[0, slot] = value
                if not keep_box:
                    boxes[0] = float("nan")
        d[self.box_key] = boxes
        d[self.points_key], d[self.point_labels_key] = points, labels
        return d
