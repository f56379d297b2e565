# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Slice-wise 3D prediction: one encoder pass per slice batch, every box decoded, masks pasted where they belong."""

from __future__ import annotations

import torch
from torch import nn

from samparser_monai.engines import LabelBoxSliceInferer, SliceDiceMetric, label_box_prompts, predict_volume


class BoxPainter(nn.Module):
    """A stand-in network with SamParser's encode/decode API: the mask of a box is the box itself (logit +1 inside,
    -1 outside), so pasting, label ids and overlaps can be checked exactly. It counts its encoder calls."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.encoded: list[int] = []

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        self.encoded.append(image.shape[0])
        return image

    def decode(self, embeddings: torch.Tensor, box: torch.Tensor, image_size) -> torch.Tensor:
        h, w = image_size
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        x0, y0, x1, y1 = (box[..., i, None, None] for i in range(4))
        inside = (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)
        return inside.float() * 2 - 1


def _label() -> torch.Tensor:
    label = torch.zeros(20, 24, 12, dtype=torch.long)
    label[2:6, 3:9, 2:5] = 1  # label 1 on axial slices 2..4
    label[10:15, 12:20, 4:8] = 2  # label 2 on slices 4..7 (slice 4 holds both)
    return label


def test_label_box_prompts_are_tight_boxes_per_label_and_slice():
    prompts = label_box_prompts(_label(), axis=2)
    assert sorted(prompts) == [2, 3, 4, 5, 6, 7]
    assert [label_id for label_id, _ in prompts[4]] == [1, 2]
    box = prompts[2][0][1]  # (x0, y0, x1, y1): x along the last axis of the slice (Y), y along X
    assert box.tolist() == [3.0, 2.0, 8.0, 5.0]
    jittered = label_box_prompts(_label(), axis=2, jitter=0.2, seed=1)
    assert jittered[2][0][1].tolist() != box.tolist()
    assert label_box_prompts(_label(), axis=2, jitter=0.2, seed=1)[2][0][1].tolist() == jittered[2][0][1].tolist()


def test_predict_volume_pastes_every_box_and_encodes_each_slice_once():
    label = _label()
    network = BoxPainter()
    image = torch.rand(1, *label.shape)
    prediction = predict_volume(network, image, label_box_prompts(label, axis=2), axis=2, batch_size=4)
    assert torch.equal(prediction, label), "box-shaped targets come back exactly, with their label ids"
    assert network.encoded == [4, 2], "6 prompted slices in batches of 4: two encoder passes, no slice twice"


def test_inferer_and_slice_dice_on_a_batch():
    label = _label()
    inferer = LabelBoxSliceInferer(axis=2, batch_size=8)
    pred = inferer(torch.rand(1, 1, *label.shape), BoxPainter(), label[None, None].float())
    assert pred.shape == (1, 1, *label.shape) and torch.equal(pred[0, 0], label)
    one_hot = torch.nn.functional.one_hot(label, 3).permute(3, 0, 1, 2)[None]
    metric = SliceDiceMetric(axis=2)
    metric(y_pred=one_hot, y=one_hot)
    assert metric.aggregate().item() == 1.0
    half = one_hot.clone()
    half[0, 1] = 0  # label 1 missed entirely: its slice Dice is 0, label 2 keeps 1
    metric.reset()
    metric(y_pred=half, y=one_hot)
    assert abs(metric.aggregate().item() - 0.5) < 1e-6
