# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Click prompts for training: where clicks fall, when the box goes, empty targets, batching and bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import list_data_collate

from samparser_monai.transforms import NO_CLICK, BoxPromptd, ClickPromptd, slice_transforms


def _sample(seed: int = 0) -> dict:
    """A 1 x 64 x 64 label with one 20 x 30 object, and its tight box."""
    label = np.zeros((1, 64, 64), dtype=np.float32)
    label[0, 10:30, 20:50] = 1
    return BoxPromptd(per="mask")({"label": label})


def _clicks(out: dict) -> tuple[torch.Tensor, torch.Tensor]:
    used = out["point_labels"][0] != NO_CLICK
    return out["points"][0][used], out["point_labels"][0][used]


def test_no_clicks_at_probability_zero_keeps_the_box():
    sample = _sample()
    out = ClickPromptd(probability=0.0, max_clicks=3)(sample)
    assert out["points"].shape == (1, 3, 2) and out["point_labels"].shape == (1, 3)
    assert bool((out["point_labels"] == NO_CLICK).all()) and torch.equal(out["box"], sample["box"])


def test_clicks_alone_start_inside_the_object_and_drop_the_box():
    label = _sample()["label"][0]
    transform = ClickPromptd(probability=1.0, keep_box_probability=0.0, max_clicks=3, near=0.25)
    counts = set()
    for seed in range(40):
        transform.set_random_state(seed)
        out = transform(_sample())
        assert bool(torch.isnan(out["box"]).all()), "clicks alone: no box"
        points, labels = _clicks(out)
        counts.add(len(points))
        assert labels[0] == 1.0 and label[int(points[0, 1]), int(points[0, 0])] == 1, "the first click is inside"
        for (x, y), value in zip(points.long().tolist(), labels.tolist()):
            assert label[y, x] == value, "positive clicks in the object, negative ones outside it"
            assert 20 - 8 <= x <= 49 + 8 and 10 - 5 <= y <= 29 + 5, "negative clicks stay near the object"
    assert counts == {1, 2, 3}


def test_the_first_click_favours_the_interior():
    transform = ClickPromptd(probability=1.0, keep_box_probability=0.0, max_clicks=1)
    transform.set_random_state(0)
    firsts = np.array([_clicks(transform(_sample()))[0][0].tolist() for _ in range(200)])
    # the object spans columns 20-49 and rows 10-29: interior clicks cluster around its centre (34.5, 19.5)
    assert np.abs(firsts.mean(axis=0) - [34.5, 19.5]).max() < 1.5
    edge = (firsts[:, 0] <= 21) | (firsts[:, 0] >= 48) | (firsts[:, 1] <= 11) | (firsts[:, 1] >= 28)
    assert edge.mean() < 0.05, "few first clicks on the object's rim"


def test_corrected_boxes_keep_the_box_and_get_a_click():
    transform = ClickPromptd(probability=1.0, keep_box_probability=1.0, max_clicks=3)
    for seed in range(20):
        transform.set_random_state(seed)
        sample = _sample()
        out = transform(sample)
        assert torch.equal(out["box"], sample["box"])
        assert 1 <= len(_clicks(out)[0]) <= 2


def test_the_share_of_clicked_samples_follows_the_probability_and_a_seed_repeats_it():
    transform = ClickPromptd(probability=0.3)
    transform.set_random_state(5)
    runs = [transform(_sample()) for _ in range(300)]
    share = np.mean([bool((r["point_labels"] != NO_CLICK).any()) for r in runs])
    assert 0.22 < share < 0.38
    transform.set_random_state(5)
    again = transform(_sample())
    assert torch.equal(again["points"], runs[0]["points"]) and torch.equal(
        again["point_labels"], runs[0]["point_labels"]
    )


def test_empty_targets_are_not_clicked():
    empty = BoxPromptd(per="mask", empty_box="random")({"label": np.zeros((1, 32, 32), dtype=np.float32)})
    out = ClickPromptd(probability=1.0)(empty)
    assert bool((out["point_labels"] == NO_CLICK).all()) and torch.isfinite(out["box"]).all()


def test_bad_arguments_are_one_sentence():
    with pytest.raises(ValueError, match="probability must be in"):
        ClickPromptd(probability=1.5)
    with pytest.raises(ValueError, match="max_clicks must be at least 1"):
        ClickPromptd(max_clicks=0)
    two = {"label": np.zeros((1, 8, 8)), "box": torch.zeros(2, 4)}
    with pytest.raises(ValueError, match="one box per sample"):
        ClickPromptd()(two)


def test_slice_transforms_with_clicks_batch_with_the_default_collate():
    transforms = slice_transforms(64, track_meta=False, click_fraction=0.5)
    transforms.set_random_state(0)
    label = np.zeros((1, 48, 64), dtype=np.float32)
    label[0, 5:20, 10:30] = 1
    items = [transforms({"image": np.random.rand(1, 48, 64).astype(np.float32), "label": label}) for _ in range(6)]
    batch = list_data_collate(items)
    assert batch["box"].shape == (6, 1, 4) and batch["points"].shape == (6, 1, 3, 2)
    assert batch["point_labels"].shape == (6, 1, 3)
    clicked = (batch["point_labels"] != NO_CLICK).any(dim=-1)[:, 0]
    assert 0 < int(clicked.sum()) < 6
    # clicks are drawn on the resized label (64 / 64 = 1: the same grid here); boxes without clicks stay finite
    assert torch.isfinite(batch["box"][~clicked]).all()
