# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""3D prompts: voxel and world boxes agree under a non-identity affine; the prompt engine propagates ROI, key-slice
and click prompts, stops where the object ends, and resolves voxels two labels claim by confidence."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from samparser_monai.engines import label_box_prompts
from samparser_monai.engines.prompt_engine import ObjectPrompt, PromptEngine
from samparser_monai.engines.prompt_files import json_box_prompts, json_object_prompts, load_box_json
from samparser_monai.engines.stop_rule import (
    FINE_TUNED_MAX_CLAIMED,
    FINE_TUNED_MIN_AREA,
    FINE_TUNED_MIN_OVERLAP,
    FINE_TUNED_OVERLAP_AFTER,
    FINE_TUNED_PAD,
    FINE_TUNED_ROI_OVERLAP,
    StopRule,
    add_stop_rule_arguments,
    stop_rule_from_args,
)
from samparser_monai.transforms import volume_transforms
from samparser_monai.transforms.box_prompts import mask_to_box

# a permuted, flipped, anisotropic, shifted grid: stored axes (i, j, k) run along (-y, x, z) in RAS
AFFINE = np.array([[0.0, 0.8, 0.0, -20.0], [-1.2, 0.0, 0.0, 35.0], [0.0, 0.0, 2.5, -7.0], [0.0, 0.0, 0.0, 1.0]])


def _volume(tmp_path) -> tuple[str, str, np.ndarray]:
    label = np.zeros((30, 24, 12), np.uint8)
    label[8:15, 4:11, 3:9] = 1
    image = (label * 0.8 + 0.1).astype(np.float32)
    for name, array in (("vol", image), ("vol_label", label)):
        nib.save(nib.Nifti1Image(array, AFFINE), str(tmp_path / f"{name}.nii.gz"))
    return str(tmp_path / "vol.nii.gz"), str(tmp_path / "vol_label.nii.gz"), label


def test_voxel_and_world_boxes_give_the_same_prompts_as_the_label(tmp_path):
    image_path, label_path, label = _volume(tmp_path)
    data = volume_transforms("mr")({"image": image_path, "label": label_path})
    image = data["image"]
    voxel_box = [8, 4, 3, 14, 10, 8]  # inclusive stored indices of the labelled block
    corners = np.array([[8, 4, 3, 1], [14, 10, 8, 1]], np.float64) @ AFFINE.T
    world_box = [*corners[:, :3].min(0), *corners[:, :3].max(0)]
    original, oriented = np.asarray(image.meta["original_affine"]), np.asarray(image.affine)
    assert not np.allclose(original, oriented), "the test volume must be reoriented"
    from_voxels = json_box_prompts(
        [{"label": 1, "box": voxel_box, "space": "voxel"}], original, oriented, image.shape[1:]
    )
    from_world = json_box_prompts(
        [{"label": 1, "box": world_box, "space": "world"}], original, oriented, image.shape[1:]
    )
    from_label = label_box_prompts(data["label"][0].long(), axis=2)
    assert sorted(from_voxels) == sorted(from_world) == sorted(from_label)
    for s in from_label:
        assert torch.allclose(from_voxels[s][0][1], from_label[s][0][1])
        assert torch.allclose(from_world[s][0][1], from_label[s][0][1], atol=1e-4)


class BrightInsideBox(nn.Module):
    """Stand-in for SamParser: segments the bright voxels inside the box (or within 10 px of the positive clicks), so
    propagation can be checked exactly. Logits grow with the box's area: a loose box is the more confident one, the
    case where confidence alone would let a propagated label take over another label's key slice."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.encoded = 0

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        self.encoded += len(image)
        return image

    def decode_prompts(self, embeddings, image_size, box=None, points=None, point_labels=None, multimask=False):
        h, w = image_size
        if box is None:
            positive = points[:, point_labels[0] > 0] if point_labels is not None else points
            box = torch.cat([positive.amin(dim=1) - 10, positive.amax(dim=1) + 10], dim=-1)
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        x0, y0, x1, y1 = (box[:, i, None, None] for i in range(4))
        inside = (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)
        confidence = 1.0 + 0.001 * ((box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]))[:, None, None]
        logits = torch.where(inside & (embeddings[:, 0] > 0.5), confidence, -1.0)
        if point_labels is not None and bool((point_labels == 0).any()):  # a background click: nothing here
            logits = torch.full_like(logits, -1.0)
        return logits, torch.full((len(box),), 0.9)

    def decode(self, embeddings, box, image_size):  # SamParser.decode: B x N boxes
        b, n = box.shape[:2]
        flat = self.decode_prompts(embeddings.repeat_interleave(n, 0), image_size, box=box.reshape(b * n, 4))[0]
        return flat.view(b, n, *flat.shape[-2:])


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1


def test_key_slice_propagation_covers_the_object_stops_and_encodes_each_slice_once():
    shape = (40, 40, 20)
    ellipsoid = _ellipsoid(shape, (20, 18, 10), (8.0, 10.0, 6.0))  # spans axis-2 slices 4..16
    image = torch.as_tensor(ellipsoid, dtype=torch.float32)[None]
    image[0, 2:6, 2:6, :] = 1.0  # a second bright object that must not be picked up
    key_box = torch.tensor([8.0, 12.0, 28.0, 28.0])  # the section on slice 10: x along axis 1, y along axis 0
    network = BrightInsideBox()
    result = PromptEngine(network, axis=2, rule=StopRule(min_area_fraction=0.0)).segment(
        image, [ObjectPrompt(label=3, slice=10, box=key_box)]
    )
    assert torch.equal(result.labels, torch.as_tensor(ellipsoid).long() * 3), "the whole object, nothing else"
    assert result.slices == [list(range(4, 17))] and sorted(result.stops[0]) == ["empty", "empty"]
    assert result.encoded == list(range(3, 18)) and network.encoded == 15, "object slices + 2, each once"


def test_the_area_rule_stops_where_the_object_thins_out():
    shape = (40, 40, 20)
    image = torch.as_tensor(_ellipsoid(shape, (20, 18, 10), (8.0, 10.0, 6.0)), dtype=torch.float32)[None]
    result = PromptEngine(BrightInsideBox(), rule=StopRule(min_area_fraction=0.5)).segment(
        image, [ObjectPrompt(label=1, slice=10, box=torch.tensor([8.0, 12.0, 28.0, 28.0]))]
    )
    areas = image[0].sum(dim=(0, 1))
    kept = [s for s in range(20) if areas[s] >= 0.5 * areas[10]]
    assert result.slices == [kept] and result.stops[0] == ["area", "area"]
    rows = {row["slice"]: row for row in result.trace[0]}  # what the rule saw, slice by slice
    assert sorted(rows) == list(range(min(kept) - 1, max(kept) + 2))
    assert all((row["stop"] == "area") == (row["area_fraction"] < 0.5) for row in rows.values())
    assert rows[10]["direction"] == 0 and rows[10]["area_fraction"] == 1.0 and rows[11]["iou"] == 0.9


class OverSegmentsByOne(BrightInsideBox):
    """A stand-in that over-segments as a fine-tuned SAM does: the box grown by one pixel, where tissue is."""

    def decode_prompts(self, embeddings, image_size, box=None, points=None, point_labels=None, multimask=False):
        grown = box + torch.tensor([-1.0, -1.0, 1.0, 1.0])
        return super().decode_prompts(embeddings, image_size, box=grown)


def test_a_shrinking_pad_holds_an_over_segmenting_model_to_the_object():
    image = torch.zeros(1, 30, 30, 12)
    image[0, 8:19, 8:19, 3:9] = 0.6  # tissue of the same look in a ring around the object
    image[0, 10:17, 10:17, 3:9] = 1.0  # the object, 7 x 7 on slices 3..8
    key = ObjectPrompt(label=1, slice=5, box=torch.tensor([10.0, 10.0, 16.0, 16.0]))
    held = PromptEngine(OverSegmentsByOne(), rule=StopRule(pad=-1.0)).segment(image, [key])
    on_key = held.labels[..., 5].clone()
    assert int(on_key.sum()) == 9 * 9, "the object and the one-pixel rim the model adds"
    assert held.slices == [list(range(3, 9))] and sorted(held.stops[0]) == ["empty", "empty"]
    assert all(torch.equal(held.labels[..., s], on_key) for s in range(3, 9)), "no slice grows past the key slice's"
    drifting = PromptEngine(OverSegmentsByOne(), rule=StopRule(pad=0.0)).segment(image, [key])
    assert drifting.stops[0] == ["overlap", "overlap"] and drifting.slices == [[5]], "each box one pixel larger"


def test_a_shrinking_box_never_inverts():
    engine = PromptEngine(BrightInsideBox(), rule=StopRule(margin=-0.4, pad=-3.0))
    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[5:7, 9:13] = True  # 4 wide, 2 high: shrunk by 3 px a side, both sides cross
    box = engine._next_box(mask, None)
    assert torch.equal(box, torch.tensor([10.5, 5.5, 10.5, 5.5])), "collapsed to the mask's centre"


def test_the_overlap_rule_stops_a_jump_to_another_object():
    image = torch.zeros(1, 30, 30, 12)
    image[0, 5:12, 5:12, 2:7] = 1.0  # the object, slices 2..6
    image[0, 10:20, 10:20, 7:10] = 1.0  # another one right after it, barely overlapping in plane
    result = PromptEngine(BrightInsideBox(), rule=StopRule(min_area_fraction=0.0, margin=1.0)).segment(
        image, [ObjectPrompt(label=1, slice=4, box=torch.tensor([5.0, 5.0, 11.0, 11.0]))]
    )
    assert result.slices == [[2, 3, 4, 5, 6]] and sorted(result.stops[0]) == ["empty", "overlap"]


def test_an_roi_never_leaves_its_slices_or_its_extent():
    image = torch.zeros(1, 30, 30, 16)
    image[0, 4:26, 4:26, :] = 1.0  # bright everywhere: only the ROI bounds stop it
    roi = torch.tensor([6.0, 8.0, 15.0, 20.0])
    result = PromptEngine(BrightInsideBox(), rule=StopRule(margin=0.5)).segment(
        image, [ObjectPrompt(label=2, slice=7, box=roi, z_range=(5, 9), clip=roi)]
    )
    expected = torch.zeros(30, 30, 16, dtype=torch.long)
    expected[8:21, 6:16, 5:10] = 2  # y rows 8..20, x columns 6..15, slices 5..9
    assert torch.equal(result.labels, expected) and sorted(result.stops[0]) == ["roi", "roi"]


def _two_touching_objects() -> tuple[torch.Tensor, list[ObjectPrompt]]:
    image = torch.zeros(1, 40, 40, 12)
    image[0, 5:15, 5:15, 1:11] = 1.0  # A: a block on slices 1..10
    image[0, 15:22, 5:15, 6:10] = 1.0  # B: touching A along axis 0, slices 6..9
    a = ObjectPrompt(label=1, slice=3, box=torch.tensor([5.0, 5.0, 14.0, 14.0]))
    b = ObjectPrompt(label=2, slice=8, box=torch.tensor([5.0, 15.0, 14.0, 21.0]))
    return image, [a, b]


def test_propagating_one_label_never_erases_another_labels_key_slice():
    image, objects = _two_touching_objects()
    # A's propagated box (grown by half its size) covers B on B's key slice, with higher confidence than B's own box
    result = PromptEngine(BrightInsideBox(), rule=StopRule(min_area_fraction=0.0, min_overlap=0.3, margin=0.5)).segment(
        image, objects
    )
    key = result.labels[:, :, 8]
    assert bool((key[15:22, 5:15] == 2).all()), "B's key slice keeps every voxel B's prompt claims"
    assert bool((key[5:15, 5:15] == 1).all())
    on_a_slice = result.labels[:, :, 7]  # propagated for both: the more confident (A's larger box) wins
    assert bool((on_a_slice[15:22, 5:15] == 1).all())


def test_the_order_of_the_labels_never_decides():
    image, objects = _two_touching_objects()
    engine = PromptEngine(BrightInsideBox(), rule=StopRule(min_area_fraction=0.0, min_overlap=0.3, margin=0.5))
    assert torch.equal(engine.segment(image, objects).labels, engine.segment(image, objects[::-1]).labels)


def test_a_mask_that_runs_into_another_object_yields_to_it():
    image = torch.zeros(1, 40, 40, 12)
    image[0, 5:15, 5:15, 1:6] = 1.0  # A: slices 1..5
    image[0, 12:22, 5:15, 6:10] = 1.0  # B: right after A, its rows overlapping A's in plane, slices 6..9
    a = ObjectPrompt(label=1, slice=3, box=torch.tensor([5.0, 5.0, 14.0, 14.0]))
    b = ObjectPrompt(label=2, slice=8, box=torch.tensor([5.0, 12.0, 14.0, 21.0]))
    loose = {"min_area_fraction": 0.0, "min_overlap": 0.3, "margin": 0.5}  # A's grown box reaches into B
    runaway = PromptEngine(BrightInsideBox(), rule=StopRule(**loose)).segment(image, [a, b])
    assert 6 in runaway.slices[0] and bool((runaway.labels[12:22, 5:15, 6] == 1).any()), "A runs on into B"
    engine = PromptEngine(BrightInsideBox(), rule=StopRule(max_claimed=0.5, **loose))
    run = engine.segment(image, [a, b])
    assert run.slices == [[1, 2, 3, 4, 5], list(range(6, 10))]
    # on slice 6 A is further from its start (3) than B (2); on slice 5, B (3) than A (2): each yields to the other
    assert sorted(run.stops[0]) == ["claimed", "empty"] and sorted(run.stops[1]) == ["claimed", "empty"]
    assert torch.equal(run.labels, (image[0] > 0).long() + (image[0, ...] > 0).long() * (torch.arange(12) >= 6))
    assert [row["claimed"] for row in run.trace[0] if row["slice"] == 6] == [1.0]
    assert [row["claimed"] for row in run.trace[1] if row["slice"] == 5] == [1.0]
    assert torch.equal(engine.segment(image, [b, a]).labels, run.labels), "the order of the objects never decides"


def test_clicks_start_an_object_and_refine_the_slices_they_are_on():
    shape = (40, 40, 20)
    image = torch.as_tensor(_ellipsoid(shape, (20, 18, 10), (8.0, 10.0, 6.0)), dtype=torch.float32)[None]
    click = ObjectPrompt(label=1, slice=10, points=torch.tensor([[18.0, 20.0, 10.0]]))
    result = PromptEngine(BrightInsideBox(), rule=StopRule(min_area_fraction=0.0, margin=1.0)).segment(image, [click])
    assert result.slices == [list(range(4, 17))]
    assert torch.equal(result.labels.bool(), torch.as_tensor(_ellipsoid(shape, (20, 18, 10), (8.0, 10.0, 6.0))))
    # a corrective click on another slice refines that slice; kept embeddings mean nothing is encoded twice
    network, embeddings = BrightInsideBox(), {}
    engine = PromptEngine(network, rule=StopRule(min_area_fraction=0.0, margin=1.0))
    first = engine.segment(image, [click], embeddings)
    points = torch.tensor([[18.0, 20.0, 10.0], [18.0, 20.0, 13.0]])
    second = engine.segment(
        image, [ObjectPrompt(1, 10, points=points, point_labels=torch.tensor([1.0, 0.0]))], embeddings
    )
    assert len(first.encoded) == 15 and second.encoded == [] and network.encoded == 15
    assert second.slices == [list(range(4, 13))], "a background click on slice 13 ends the object there"
    assert not second.labels[:, :, 13:].any() and second.stops[0] == ["empty", "empty"]
    with pytest.raises(ValueError, match="neither a box nor a click on its start slice 5"):
        PromptEngine(BrightInsideBox()).segment(image, [ObjectPrompt(label=1, slice=5, points=click.points)])


def test_a_click_past_where_propagation_stopped_starts_the_object_again_there():
    image = torch.zeros(1, 30, 30, 15)
    image[0, 5:15, 5:15, 2:8] = 1.0  # slices 2..7: 100 pixels
    image[0, 8:12, 8:12, 8:13] = 1.0  # slices 8..12: a thin tail of 16 pixels, under the area stop (0.2 x 100)
    rule = StopRule(min_area_fraction=0.2, margin=1.0)
    start = [[10.0, 10.0, 4.0]]
    one = PromptEngine(BrightInsideBox(), rule=rule).segment(image, [ObjectPrompt(1, 4, points=torch.tensor(start))])
    assert one.slices == [list(range(2, 8))] and sorted(one.stops[0]) == ["area", "empty"]
    two = ObjectPrompt(1, 4, points=torch.tensor(start + [[10.0, 10.0, 11.0]]))
    run = PromptEngine(BrightInsideBox(), rule=rule).segment(image, [two])
    assert run.slices == [list(range(2, 13))], "the click on slice 11 starts the tail and propagates down to slice 8"
    assert sorted(run.stops[0]) == ["area", "empty", "empty", "met"] and torch.equal(run.labels.bool(), image[0] > 0)
    roi = ObjectPrompt(1, 4, points=two.points, z_range=(1, 9))
    run = PromptEngine(BrightInsideBox(), rule=rule).segment(image, [roi])
    assert run.slices == [list(range(2, 8))] and "click-roi" in run.stops[0], "a click outside the ROI is reported"


class EraseAroundNegativeClicks(BrightInsideBox):
    """Like SAM, a negative click removes only the part of the mask around it (within 4 px), not the whole slice."""

    def decode_prompts(self, embeddings, image_size, box=None, points=None, point_labels=None, multimask=False):
        if points is None:  # boxes alone
            return super().decode_prompts(embeddings, image_size, box)
        positive = point_labels[0] > 0
        logits, iou = super().decode_prompts(
            embeddings, image_size, box, points[:, positive], point_labels[:, positive]
        )
        yy, xx = torch.meshgrid(torch.arange(image_size[0]), torch.arange(image_size[1]), indexing="ij")
        for (x, y), label in zip(points[0].tolist(), point_labels[0].tolist()):
            if label == 0:
                logits[0][(xx - x) ** 2 + (yy - y) ** 2 <= 16] = -1.0
        return logits, iou


def test_a_slice_with_negative_clicks_only_can_end_propagation_and_one_with_a_positive_click_is_kept():
    image = torch.zeros(1, 30, 30, 15)
    image[0, 5:15, 5:15, 2:13] = 1.0  # the object on slices 2..6, the same tissue leaking on to slice 12
    rule = StopRule(min_area_fraction=0.7, margin=1.0)
    start = [[10.0, 10.0, 4.0]]
    leak = ObjectPrompt(1, 4, points=torch.tensor(start))
    assert PromptEngine(EraseAroundNegativeClicks(), rule=rule).segment(image, [leak]).slices == [list(range(2, 13))]
    # a negative click in the leak on slice 8 leaves 51 of 100 pixels there: under the area stop, so slices 8-12 go
    negative = ObjectPrompt(
        1, 4, points=torch.tensor(start + [[10.0, 10.0, 8.0]]), point_labels=torch.tensor([1.0, 0.0])
    )
    run = PromptEngine(EraseAroundNegativeClicks(), rule=rule).segment(image, [negative])
    assert run.slices == [list(range(2, 8))] and sorted(run.stops[0]) == ["area", "empty"]
    assert not run.labels[..., 8:].any()
    # the same small mask under a positive click is the user's answer for that slice: kept, and propagation goes on
    both = ObjectPrompt(
        1, 4, points=torch.tensor(start + [[10.0, 10.0, 8.0], [6.0, 6.0, 8.0]]), point_labels=torch.tensor([1.0, 0, 1])
    )
    run = PromptEngine(EraseAroundNegativeClicks(), rule=rule).segment(image, [both])
    assert 8 in run.slices[0] and int(run.labels[..., 8].sum()) == 100 - 49


@pytest.mark.parametrize("fine_tuned", [False, True])
def test_a_single_click_decodes_the_output_its_model_was_trained_for(fine_tuned):
    """The stock SAM answers one click with its most confident ambiguity mask; a fine-tuned model with the
    single-mask output fine-tuning trained; clicks with a box or several clicks always take the single mask."""
    calls = []

    class Recording(BrightInsideBox):
        def decode_prompts(self, embeddings, image_size, box=None, points=None, point_labels=None, multimask=False):
            calls.append((box is None, 0 if points is None else points.shape[1], multimask))
            return super().decode_prompts(embeddings, image_size, box, points, point_labels, multimask)

    shape = (40, 40, 20)
    image = torch.as_tensor(_ellipsoid(shape, (20, 18, 10), (8.0, 10.0, 6.0)), dtype=torch.float32)[None]
    rule = StopRule.for_model(fine_tuned, min_area_fraction=0.0, margin=1.0)
    points = torch.tensor([[18.0, 20.0, 10.0], [19.0, 20.0, 12.0]])
    PromptEngine(Recording(), rule=rule).segment(image, [ObjectPrompt(label=1, slice=10, points=points)])
    clicked = [call for call in calls if call[1] > 0]
    assert clicked[0] == (True, 1, not fine_tuned), "the start slice: one click alone"
    assert all(not multimask for _, _, multimask in clicked[1:]) and len(clicked) == 2


def test_prompts_outside_the_image_or_of_zero_size_are_one_sentence():
    eye = np.eye(4)
    with pytest.raises(ValueError, match=r"lies outside the image: the image's voxel extent is \[0, 0, 0\] to \[9"):
        json_object_prompts(
            [{"label": 1, "box": [20, 20, 2, 30, 30, 4], "space": "voxel"}], "roi", eye, eye, (10, 10, 5)
        )
    with pytest.raises(ValueError, match="has zero size in the slice plane"):
        json_object_prompts([{"label": 1, "box": [2, 3, 1, 2, 8, 4], "space": "voxel"}], "roi", eye, eye, (10, 10, 5))
    with pytest.raises(ValueError, match=r"Click \[3, 3, 9\] \(voxel\) lies outside the image"):
        json_object_prompts([{"label": 1, "points": [[3, 3, 9]], "space": "voxel"}], "points", eye, eye, (10, 10, 5))
    in_roi = {"label": 1, "box": [1, 1, 1, 8, 8, 3], "points": [[3, 3, 2], [5, 5, 4]], "space": "voxel"}
    with pytest.raises(ValueError, match=r"Click \[5, 5, 4\] \(voxel\) lies outside its box"):
        json_object_prompts([in_roi], "points", eye, eye, (10, 10, 5))
    negative_outside = {**in_roi, "point_labels": [1, 0]}  # a background click may lie anywhere
    assert json_object_prompts([negative_outside], "points", eye, eye, (10, 10, 5))[0].z_range == (1, 3)
    key = json_object_prompts([{"label": 4, "box": [1, 2, 3, 6, 8, 3], "space": "voxel"}], "key", eye, eye, (10, 10, 5))
    assert key[0].slice == 3 and key[0].box.tolist() == [2.0, 1.0, 8.0, 6.0] and key[0].z_range is None


def test_box_json_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"case": [{"label": 1, "box": [1, 2, 3], "space": "voxel"}]}))
    with pytest.raises(
        ValueError, match=r"case 'case': each prompt needs a positive integer 'label', a 6-number 'box'"
    ):
        load_box_json(bad)
    for entry in (
        {"label": -1, "box": [1, 2, 3, 4, 5, 6], "space": "voxel"},
        {"label": 1, "points": [[1, 2]], "space": "voxel"},
    ):
        bad.write_text(json.dumps({"case": [entry]}))
        with pytest.raises(ValueError, match="each prompt needs a positive integer 'label'"):
            load_box_json(bad)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="could not be read as JSON"):
        load_box_json(tmp_path / "broken.json")


@pytest.mark.parametrize("protocol", ["label", "roi_boxes", "roi", "key", "click1", "click3"])
def test_simulated_user_prompts_segment_the_reference(protocol):
    from samparser_monai.engines.simulated_prompts import simulate

    shape = (40, 40, 20)
    ellipsoid = _ellipsoid(shape, (20, 18, 10), (8.0, 10.0, 6.0))
    image = torch.as_tensor(ellipsoid, dtype=torch.float32)[None]
    reference = ellipsoid.astype(np.int64) * 2
    run = simulate(protocol, BrightInsideBox(), image, reference, rule=StopRule(min_area_fraction=0.0, margin=1.0))
    assert torch.equal(run.labels, torch.as_tensor(reference)), protocol
    slices = 13  # the ellipsoid spans slices 4..16
    expected = {"label": slices, "roi_boxes": slices + 2, "roi": slices + 2, "key": slices + 2}
    assert run.encoder_passes == expected.get(protocol, slices + 2)
    assert (len(run.trace) > 0) == (protocol not in ("label", "roi_boxes"))
    with pytest.raises(ValueError, match="Unknown prompt protocol 'lasso'"):
        simulate("lasso", BrightInsideBox(), image, reference)


def test_protocols_sharing_embeddings_encode_each_slice_once_and_give_the_same_masks_and_counts():
    """``simulate(..., embeddings)``: one cache for every protocol of an image (the benchmark's --share-embeddings)
    changes neither a mask nor a protocol's encoder-pass count, and encodes each slice once."""
    from samparser_monai.engines.simulated_prompts import PROTOCOLS, simulate

    shape = (40, 40, 20)
    ellipsoid = _ellipsoid(shape, (20, 18, 10), (8.0, 10.0, 6.0))
    image = torch.as_tensor(ellipsoid, dtype=torch.float32)[None]
    reference = ellipsoid.astype(np.int64) * 2
    rule = StopRule(min_area_fraction=0.0, margin=1.0)
    alone, shared_net, shared = BrightInsideBox(), BrightInsideBox(), {}
    for protocol in PROTOCOLS:
        own = simulate(protocol, alone, image, reference, rule=rule)
        together = simulate(protocol, shared_net, image, reference, rule=rule, embeddings=shared)
        assert torch.equal(own.labels, together.labels), protocol
        assert own.encoder_passes == together.encoder_passes, protocol
    assert shared_net.encoded == len(shared) == 15, "the ellipsoid's 13 slices and one past each end, once"
    assert alone.encoded > 4 * shared_net.encoded


def test_the_growth_rule_stops_a_mask_that_spreads_past_the_object():
    image = torch.zeros(1, 40, 40, 12)
    for s in range(12):  # a square whose side grows by 2 pixels a slice: area 4x the start's by slice 7 from 2
        half = 3 + s
        image[0, 20 - half : 20 + half, 20 - half : 20 + half, s] = 1.0
    result = PromptEngine(
        BrightInsideBox(), rule=StopRule(min_area_fraction=0.0, max_area_fraction=2.0, min_overlap=0.0, margin=1.0)
    )
    run = result.segment(image, [ObjectPrompt(label=1, slice=4, box=torch.tensor([13.0, 13.0, 26.0, 26.0]))])
    areas = {s: (2 * (3 + s)) ** 2 for s in range(12)}
    kept = [s for s in range(12) if areas[s] <= 2.0 * areas[4]]
    assert run.slices == [kept] and sorted(run.stops[0]) == ["growth", "volume"]


def test_the_stop_rule_names_the_first_test_that_fires():
    """``StopRule.stops``, the one statement of the rule (the engine's and choose_stop_rule.py's), test by test."""
    rule = StopRule(min_area_fraction=0.2, max_area_fraction=2.0, min_iou=0.7, min_overlap=0.8, max_claimed=0.5,
                    overlap_after=2, roi_min_overlap=0.5)  # fmt: skip
    assert rule.stops(1.0, 0.9, 0.9, 3) == ""
    assert rule.stops(0.1, 0.1, 0.1, 3, claimed=0.9) == "area", "the first that fires, in order"
    assert rule.stops(2.5, 0.9, 0.9, 3) == "growth"
    assert rule.stops(1.0, 0.6, 0.9, 3) == "iou"
    assert rule.stops(1.0, 0.9, 0.6, 3) == "overlap"
    assert rule.stops(1.0, 0.9, 0.6, 2) == "", "no overlap test next to the start (overlap_after)"
    assert rule.stops(1.0, 0.9, 0.6, 3, in_roi=True) == "", "within an ROI its own overlap (0.6 >= 0.5)"
    assert rule.stops(1.0, 0.9, 0.9, 3, claimed=0.6) == "claimed"
    assert StopRule(max_area_fraction=0.0, max_claimed=0.0).stops(9.0, 0.9, 0.9, 1, claimed=1.0) == "", "0: off"


def test_within_an_roi_propagation_follows_a_moving_object_past_the_key_slice_overlap_stop():
    image = torch.zeros(1, 40, 40, 8)
    for s in range(8):  # a 10 x 10 square moving 3 pixels a slice: 70% of each mask lies on the previous one
        image[0, 10:20, 3 + 3 * s : 13 + 3 * s, s] = 1.0
    rule = StopRule(min_area_fraction=0.0, margin=1.0, min_overlap=0.8, roi_min_overlap=0.5)
    key = ObjectPrompt(label=1, slice=3, box=mask_to_box(image[0, :, :, 3] > 0))
    run = PromptEngine(BrightInsideBox(), rule=rule).segment(image, [key])
    assert run.slices == [[3]] and run.stops[0] == ["overlap", "overlap"], "a key slice: 70% < 80%, stopped"
    roi = ObjectPrompt(label=1, slice=3, box=key.box, z_range=(1, 6))
    run = PromptEngine(BrightInsideBox(), rule=rule).segment(image, [roi])
    assert run.slices == [list(range(1, 7))] and run.stops[0] == ["roi", "roi"], "within an ROI: 70% >= 50%, kept"
    assert torch.equal(run.labels[..., 1:7].bool(), image[0, ..., 1:7] > 0)
    without = StopRule(min_area_fraction=0.0, margin=1.0, min_overlap=0.8)  # roi_min_overlap None: min_overlap
    assert PromptEngine(BrightInsideBox(), rule=without).segment(image, [roi]).slices == [[3]]


def test_next_to_the_start_a_moving_object_passes_the_overlap_stop_and_further_on_a_jump_still_stops():
    image = torch.zeros(1, 40, 40, 11)
    # a 10 x 10 square: 4 px off the start slice's next to it (60% overlap), then 1 px a slice (90%), then 5 px (50%)
    left = {5: 10, 4: 14, 6: 14, 3: 15, 7: 15, 2: 20, 8: 20, 1: 21, 9: 21, 0: 22, 10: 22}
    for s, x in left.items():
        image[0, 10:20, x : x + 10, s] = 1.0
    key = ObjectPrompt(label=1, slice=5, box=mask_to_box(image[0, :, :, 5] > 0))
    runs = {
        after: PromptEngine(
            BrightInsideBox(), rule=StopRule(min_area_fraction=0.0, margin=1.0, overlap_after=after)
        ).segment(image, [key])
        for after in (0, 1, 2)
    }
    assert runs[0].slices == [[5]] and runs[0].stops[0] == ["overlap", "overlap"], "60% < 80% next to the start"
    for after in (1, 2):
        assert runs[after].slices == [[3, 4, 5, 6, 7]], "the first slices are kept; 90% further on passes"
        assert runs[after].stops[0] == ["overlap", "overlap"], "the 5-pixel jump 3 slices out still stops"
    assert torch.equal(runs[2].labels[..., 3:8].bool(), image[0, ..., 3:8] > 0)


def test_fine_tuned_models_shrink_their_boxes_unless_told_otherwise():
    from samparser_monai.engines import prompt_engine

    assert prompt_engine.StopRule is StopRule, "still importable from where it was first defined"
    assert StopRule.for_model(fine_tuned=False) == StopRule()
    fine_tuned = StopRule.for_model(fine_tuned=True)
    expected = StopRule(
        min_area_fraction=FINE_TUNED_MIN_AREA,
        min_overlap=FINE_TUNED_MIN_OVERLAP,
        max_claimed=FINE_TUNED_MAX_CLAIMED,
        pad=FINE_TUNED_PAD,
        roi_min_overlap=FINE_TUNED_ROI_OVERLAP,
        overlap_after=FINE_TUNED_OVERLAP_AFTER,
        click_multimask=False,
    )
    assert fine_tuned == expected and FINE_TUNED_PAD < 0 and FINE_TUNED_ROI_OVERLAP < StopRule().min_overlap
    assert FINE_TUNED_OVERLAP_AFTER > StopRule().overlap_after == 0, "the stock model tests overlap from the start"
    assert FINE_TUNED_MIN_AREA < StopRule().min_area_fraction and FINE_TUNED_MIN_OVERLAP < StopRule().min_overlap
    assert 0 < FINE_TUNED_MAX_CLAIMED < 1 and StopRule().max_claimed == 0, "the stock model's rule ignores other labels"
    parser = argparse.ArgumentParser()
    add_stop_rule_arguments(parser)
    assert stop_rule_from_args(parser.parse_args([]), fine_tuned=False) == StopRule()
    assert stop_rule_from_args(parser.parse_args([]), fine_tuned=True) == expected
    explicit = stop_rule_from_args(
        parser.parse_args(
            ["--pad", "0", "--stop-iou", "0.5", "--stop-overlap-roi", "0.7", "--stop-claimed", "0.4"]
            + ["--stop-overlap-after", "0", "--stop-area", "0.3", "--stop-overlap", "0.9"]
        ),
        fine_tuned=True,
    )
    wanted = StopRule(
        min_area_fraction=0.3,
        min_overlap=0.9,
        pad=0.0,
        min_iou=0.5,
        roi_min_overlap=0.7,
        max_claimed=0.4,
        click_multimask=False,
    )
    assert explicit == wanted, "flags win"
    assert stop_rule_from_args(parser.parse_args([]), fine_tuned=True).mask_prompt is None, "auto: the checkpoint's"
    assert stop_rule_from_args(parser.parse_args(["--mask-prompt", "off"]), fine_tuned=True).mask_prompt is False
    assert stop_rule_from_args(parser.parse_args(["--mask-prompt", "on"]), fine_tuned=True).mask_prompt is True


@pytest.mark.parametrize(
    "configs, zero_shot",
    [(["inference.json"], False), (["train.json", "evaluate.json"], False), (["train.json", "evaluate.json"], True)],
)
def test_the_bundle_propagates_with_the_rule_of_its_model(configs, zero_shot):
    from monai.bundle import ConfigParser

    folder = Path(__file__).resolve().parents[2] / "bundle" / "configs"
    parser = ConfigParser()
    parser.read_config([str(folder / name) for name in configs])
    if zero_shot:
        parser["zero_shot"] = True
    assert parser.get_parsed_content("propagation_rule") == StopRule.for_model(fine_tuned=not zero_shot)


class RecordsMaskPrompts(BrightInsideBox):
    """A stand-in that records the mask prompts propagation passes, per decoded batch."""

    def __init__(self, training_prompts: dict) -> None:
        super().__init__()
        self.training_prompts, self.seen = training_prompts, []

    def decode_prompts(self, embeddings, image_size, box=None, points=None, point_labels=None, multimask=False,
                       mask_prompt=None):  # fmt: skip
        self.seen.append(None if mask_prompt is None else mask_prompt.clone())
        return super().decode_prompts(embeddings, image_size, box, points, point_labels, multimask)


def test_propagation_passes_the_previous_mask_to_a_model_trained_with_mask_prompts():
    shape = (40, 40, 20)
    ellipsoid = _ellipsoid(shape, (20, 18, 10), (8.0, 10.0, 6.0))
    image = torch.as_tensor(ellipsoid, dtype=torch.float32)[None]
    key = ObjectPrompt(label=1, slice=10, box=torch.tensor([8.0, 12.0, 28.0, 28.0]))
    trained = RecordsMaskPrompts({"mask_prompt_fraction": 0.5})
    result = PromptEngine(trained, rule=StopRule(min_area_fraction=0.0)).segment(image, [key])
    assert torch.equal(result.labels, torch.as_tensor(ellipsoid).long()), "the same masks as with boxes alone"
    start, first_step = trained.seen[0], trained.seen[1]
    assert bool((start == -1).all()), "the key slice has no previous mask"
    shrunk = torch.as_tensor(ndimage.binary_erosion(ellipsoid[..., 10], np.ones((3, 3))))
    assert torch.equal(first_step[0] > 0, shrunk), "slice 9 gets slice 10's mask, a pixel smaller (mask_shrink)"
    assert torch.equal(first_step[1] > 0, shrunk), "... and so does slice 11"
    exact = RecordsMaskPrompts({"mask_prompt_fraction": 0.5})
    PromptEngine(exact, rule=StopRule(min_area_fraction=0.0, mask_shrink=0)).segment(image, [key])
    assert torch.equal(exact.seen[1][0] > 0, torch.as_tensor(ellipsoid[..., 10])), "mask_shrink 0: the mask as is"
    boxes_only = RecordsMaskPrompts({"click_fraction": 0.5})
    PromptEngine(boxes_only, rule=StopRule(min_area_fraction=0.0)).segment(image, [key])
    assert all(seen is None for seen in boxes_only.seen), "a model trained on boxes gets boxes"
    forced = RecordsMaskPrompts({})
    PromptEngine(forced, rule=StopRule(min_area_fraction=0.0, mask_prompt=True)).segment(image, [key])
    assert all(seen is not None for seen in forced.seen), "the rule can ask for masks whatever the checkpoint says"
    assert StopRule.for_model(True).mask_prompt is None, "by default the checkpoint decides"


def test_encode_slices_encodes_only_the_missing_slices_in_batches_and_fills_the_cache():
    """The one encoding helper of slice-wise prediction and the prompt engine: missing slices only, ascending, in
    batches of ``batch_size``, the embeddings of the right slices added to the caller's cache."""
    from samparser_monai.engines import encode_slices

    class Recorder(BrightInsideBox):
        def encode(self, image: torch.Tensor) -> torch.Tensor:
            self.batches = [*getattr(self, "batches", []), len(image)]
            return super().encode(image)

    image = torch.arange(6.0).reshape(1, 1, 1, 6).expand(1, 2, 2, 6).contiguous()  # slice s holds the value s
    net, cache = Recorder(), {2: torch.full((1, 2, 2), -1.0)}
    assert encode_slices(net, image, [5, 0, 2, 3, 1, 5], axis=2, cache=cache, batch_size=2) is cache
    assert net.batches == [2, 2] and sorted(cache) == [0, 1, 2, 3, 5]
    assert all(float(cache[s].unique()) == s for s in (0, 1, 3, 5)), "each embedding is its own slice's"
    assert float(cache[2].unique()) == -1.0, "a cached slice is not encoded again"
