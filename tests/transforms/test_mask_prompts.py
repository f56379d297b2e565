# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Mask prompts for training: a neighbour's mask and its shrunk box, "no mask" elsewhere, batching and resizing."""

from __future__ import annotations

import pytest
import torch
from monai.data import list_data_collate

from samparser_monai.transforms import (
    NO_MASK,
    MaskPromptd,
    UserBoxPromptd,
    grow_box,
    image_2d_transforms,
    shift_mask,
    slice_transforms,
)


def _sample(next_slice: bool = True) -> dict:
    """A 1 x 20 x 24 target (box (6, 5, 9, 8)) whose next slice holds a larger object (box (3, 4, 14, 11))."""
    label = torch.zeros(1, 20, 24)
    label[0, 5:9, 6:10] = 1
    neighbours = torch.zeros(2, 20, 24)
    if next_slice:
        neighbours[1, 4:12, 3:15] = 1
    return {"label": label, "box": torch.tensor([[6.0, 5.0, 9.0, 8.0]]), "neighbours": neighbours,
            "roi_box": torch.tensor([2.0, 2.0, 16.0, 13.0])}  # fmt: skip


def test_a_prompted_sample_gets_the_neighbours_mask_and_its_box_shrunk_a_pixel():
    out = MaskPromptd(probability=1.0, perturb=0)(_sample())
    assert torch.equal(out["mask_prompt"][0], _sample()["neighbours"][1]), "the side that holds the object"
    assert out["box"].tolist() == [[4.0, 5.0, 13.0, 10.0]], "the engine's propagated box: tight, one pixel in"
    assert "neighbours" not in out and "roi_box" not in out
    grown = MaskPromptd(probability=1.0, margin=0.25, pad=0.0, perturb=0)(_sample())
    assert grown["box"].tolist() == [[0.25, 2.25, 16.75, 12.75]]


def test_the_prompt_is_the_neighbour_grown_or_shrunk_by_up_to_perturb_pixels():
    transform = MaskPromptd(probability=1.0, perturb=2)
    transform.set_random_state(0)
    areas = set()
    for _ in range(40):
        out = transform(_sample())
        mask = out["mask_prompt"][0] > 0
        rows, cols = torch.nonzero(mask.any(dim=1))[:, 0], torch.nonzero(mask.any(dim=0))[:, 0]
        change = int(rows[0]) - 4  # the object spans rows 4..11, columns 3..14: a square grows or shrinks evenly
        assert -2 <= change <= 2 and (int(rows[-1]), int(cols[0]), int(cols[-1])) == (
            11 - change,
            3 + change,
            14 - change,
        )
        assert out["box"][0].tolist() == [cols[0] + 1.0, rows[0] + 1.0, cols[-1] - 1.0, rows[-1] - 1.0], "its box"
        areas.add(int(mask.sum()))
    assert len(areas) == 5, "every perturbation from -2 to +2 pixels is drawn"
    with pytest.raises(ValueError, match="perturb must be"):
        MaskPromptd(perturb=-1)


def test_shift_moves_the_prompt_and_its_box_by_up_to_shift_pixels():
    transform = MaskPromptd(probability=1.0, perturb=0, shift=2)
    transform.set_random_state(0)
    neighbour = _sample()["neighbours"][1] > 0
    offsets = set()
    for _ in range(60):
        out = transform(_sample())
        mask = out["mask_prompt"][0] > 0
        rows, cols = torch.nonzero(mask.any(dim=1))[:, 0], torch.nonzero(mask.any(dim=0))[:, 0]
        offset = (int(rows[0]) - 4, int(cols[0]) - 3)  # the object spans rows 4..11, columns 3..14
        assert torch.equal(mask, shift_mask(neighbour, *offset)) and int(mask.sum()) == int(neighbour.sum())
        assert out["box"][0].tolist() == [cols[0] + 1.0, rows[0] + 1.0, cols[-1] - 1.0, rows[-1] - 1.0], "its box"
        offsets.add(offset)
    assert {r for r, _ in offsets} == {c for _, c in offsets} == {-2, -1, 0, 1, 2}, "every shift on both axes"
    unshifted = MaskPromptd(probability=1.0, perturb=0)
    assert torch.equal(unshifted(_sample())["mask_prompt"][0] > 0, neighbour), "shift 0 (the default): in place"
    with pytest.raises(ValueError, match="shift must be"):
        MaskPromptd(shift=-1)


def test_shift_mask_drops_what_leaves_the_slice_and_never_empties_a_mask():
    mask = torch.zeros(6, 7, dtype=torch.bool)
    mask[1:3, 2:4] = True
    moved = shift_mask(mask, 1, -2)
    assert torch.nonzero(moved).tolist() == [[2, 0], [2, 1], [3, 0], [3, 1]]
    edge = shift_mask(mask, 0, -3)
    assert torch.nonzero(edge).tolist() == [[1, 0], [2, 0]], "no wrap: the columns pushed past the edge are gone"
    assert torch.equal(shift_mask(mask, 10, 0), mask) and torch.equal(shift_mask(mask, 0, 0), mask)


def test_no_mask_when_not_drawn_or_nothing_beside_or_background():
    for sample, transform in (
        (_sample(), MaskPromptd(probability=0.0)),
        (_sample(next_slice=False), MaskPromptd(probability=1.0)),  # the object's end slice
        ({"label": torch.zeros(1, 20, 24), "box": torch.tensor([[1.0, 1.0, 5.0, 5.0]])}, MaskPromptd(probability=1.0)),
    ):
        out = transform(dict(sample))
        assert out["mask_prompt"].shape == (1, 20, 24) and bool((out["mask_prompt"] == NO_MASK).all())
        assert torch.equal(out["box"], sample["box"]), "the sample keeps its own box"


def test_share_of_prompted_samples_and_batching():
    transform = MaskPromptd(probability=0.5)
    transform.set_random_state(0)
    outs = [transform(_sample()) for _ in range(200)]
    prompted = sum(bool((o["mask_prompt"] >= 0).all()) for o in outs)
    assert 70 <= prompted <= 130
    batch = list_data_collate(outs[:4])
    assert batch["mask_prompt"].shape == (4, 1, 20, 24) and batch["box"].shape == (4, 1, 4)
    with pytest.raises(ValueError, match="probability must be in"):
        MaskPromptd(probability=1.5)


def test_slice_transforms_resize_the_mask_prompt_with_the_image():
    chain = slice_transforms(48, jitter=0.0, track_meta=False, mask_fraction=1.0)
    shifts = [t.shift for t in slice_transforms(48, mask_fraction=0.5, mask_shift=2).transforms
              if isinstance(t, MaskPromptd)]  # fmt: skip
    assert shifts == [2], "the bundle's train_mask_prompt_shift reaches the transform"
    sample = _sample()
    sample["image"] = torch.rand(1, 20, 24)
    out = chain(sample)
    assert out["mask_prompt"].shape == (1, 48, 48) and set(out["mask_prompt"].unique().tolist()) == {0.0, 1.0}
    assert out["mask_prompt"][0, 12:20, 10:26].all() and not out["mask_prompt"][0, 40:].any(), "resized 2x, padded"
    kept = [t for t in slice_transforms(48, box_protocol="user", mask_fraction=0.5).transforms
            if isinstance(t, UserBoxPromptd)]  # fmt: skip
    assert kept[0].keep_context, "the user boxes leave the neighbours to the mask prompt"


def test_grow_box_shrinks_to_the_centre_and_stays_inside():
    box = torch.tensor([9.0, 5.0, 12.0, 6.0])
    assert grow_box(box, (20, 20), pad=-3.0).tolist() == [10.5, 5.5, 10.5, 5.5]
    assert grow_box(box, (20, 20), margin=1.0, pad=2.0).tolist() == [4.0, 2.0, 17.0, 9.0]
    assert grow_box(box, (8, 14), pad=5.0).tolist() == [4.0, 0.0, 13.0, 7.0], "inside the image"
    assert grow_box(box, (20, 20), pad=5.0, clip=torch.tensor([6.0, 3.0, 15.0, 9.0])).tolist() == [6.0, 3.0, 15.0, 9.0]


def test_2d_images_refuse_mask_prompts_in_one_sentence():
    with pytest.raises(ValueError, match="needs the neighbouring slices of 3D volumes, and 2D images have none"):
        image_2d_transforms(64, mask_fraction=0.5)
