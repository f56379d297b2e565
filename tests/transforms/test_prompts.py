# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Box prompts: tight boxes, jitter bounds, seeding, per label/component boxes and empty targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from samparser_monai.transforms import BoxPromptd, jitter_box, mask_to_box


def two_label_map() -> np.ndarray:
    """1 x 40 x 60 map: label 1 in two separate blobs, label 2 in two squares touching only at a corner."""
    label = np.zeros((1, 40, 60), dtype=np.int64)
    label[0, 2:6, 3:10] = 1  # label 1, component A (rows 2-5, cols 3-9)
    label[0, 30:38, 40:58] = 1  # label 1, component B (rows 30-37, cols 40-57)
    label[0, 10:15, 20:25] = 2  # label 2: two squares, 8-connected through one corner
    label[0, 15:20, 25:30] = 2
    return label


def test_mask_to_box_is_tight_and_inclusive():
    mask = np.zeros((7, 9), dtype=bool)
    mask[3, 5] = True
    assert mask_to_box(mask).tolist() == [5.0, 3.0, 5.0, 3.0]
    mask[1:4, 2:8] = True
    for m in (mask, mask[None], torch.as_tensor(mask), torch.as_tensor(mask, dtype=torch.uint8)[None]):
        box = mask_to_box(m)
        assert box.dtype == torch.float32
        assert box.tolist() == [2.0, 1.0, 7.0, 3.0]  # x = column (last axis), y = row
    assert mask_to_box(np.zeros((5, 5))) is None
    with pytest.raises(ValueError, match="H x W"):
        mask_to_box(np.zeros((2, 5, 5)))


def test_zero_jitter_gives_the_tight_box():
    label = two_label_map()
    out = BoxPromptd(per="mask")({"label": label})
    assert out["box"].dtype == torch.float32 and out["box_label"].dtype == torch.int64
    assert out["box"].tolist() == [[3.0, 2.0, 57.0, 37.0]]
    assert out["box_label"].tolist() == [1]
    box = torch.tensor([3.0, 2.0, 57.0, 37.0])
    assert torch.equal(jitter_box(box, 0.0, image_size=(40, 60)), box)


@pytest.mark.parametrize("mode, jitter", [("pixels", 4.0), ("fraction", 0.2), ("fraction", 2.0)])
def test_jitter_bounds_over_many_seeds(mode, jitter):
    box = torch.tensor([[10.0, 5.0, 30.0, 25.0], [0.0, 0.0, 3.0, 2.0], [50.0, 30.0, 59.0, 39.0]])
    w, h = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
    bound = torch.full_like(box, jitter) if mode == "pixels" else jitter * torch.stack([w, h, w, h], dim=1)
    for seed in range(300):
        free = jitter_box(box, jitter, mode, rng=np.random.RandomState(seed))  # no clipping
        assert ((free - box).abs() <= bound + 1e-4).all()
        assert (free[:, :2] <= free[:, 2:]).all()
        clipped = jitter_box(box, jitter, mode, image_size=(40, 60), rng=np.random.RandomState(seed))
        assert ((clipped - box).abs() <= bound + 1e-4).all()
        assert (clipped >= 0).all() and (clipped[:, 0::2] <= 59).all() and (clipped[:, 1::2] <= 39).all()
        assert (clipped[:, :2] <= clipped[:, 2:]).all()


def test_box_prompt_jitter_stays_in_bounds_and_inside_image():
    label = two_label_map()
    tight = BoxPromptd(per="component")({"label": label})["box"]
    t = BoxPromptd(per="component", jitter=5.0, jitter_mode="pixels")
    moved = False
    for seed in range(200):
        box = t.set_random_state(seed)({"label": label})["box"]
        assert box.shape == tight.shape
        assert ((box - tight).abs() <= 5.0 + 1e-4).all()
        assert (box >= 0).all() and (box[:, 0::2] <= 59).all() and (box[:, 1::2] <= 39).all()
        assert (box[:, :2] <= box[:, 2:]).all()
        moved |= not torch.equal(box, tight)
    assert moved


def test_same_seed_same_boxes():
    label = two_label_map()
    make = lambda: BoxPromptd(per="label", jitter=0.1)  # noqa: E731
    a = make().set_random_state(7)({"label": label})["box"]
    b = make().set_random_state(7)({"label": label})["box"]
    c = make().set_random_state(8)({"label": label})["box"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    box = torch.tensor([10.0, 5.0, 30.0, 25.0])
    assert torch.equal(jitter_box(box, 2.0, "pixels", generator=g1), jitter_box(box, 2.0, "pixels", rng=g2))


def test_per_label_and_per_component_counts():
    label = two_label_map()
    by_label = BoxPromptd(per="label")({"label": label})
    assert by_label["box_label"].tolist() == [1, 2]
    assert by_label["box"].tolist() == [[3.0, 2.0, 57.0, 37.0], [20.0, 10.0, 29.0, 19.0]]
    by_component = BoxPromptd(per="component")({"label": label})
    assert by_component["box_label"].tolist() == [1, 1, 2]  # the corner-touching squares are one 8-component
    assert by_component["box"].tolist() == [[3.0, 2.0, 9.0, 5.0], [40.0, 30.0, 57.0, 37.0], [20.0, 10.0, 29.0, 19.0]]
    only_two = BoxPromptd(per="component", labels=[2, 5])({"label": label})
    assert only_two["box_label"].tolist() == [2]
    mask_of_two = BoxPromptd(per="mask", labels=[2])({"label": label})
    assert mask_of_two["box"].tolist() == [[20.0, 10.0, 29.0, 19.0]] and mask_of_two["box_label"].tolist() == [1]
    largest = BoxPromptd(per="component", max_boxes=2)({"label": label})
    assert largest["box_label"].tolist() == [1, 2]  # 18 x 8 and 10 x 10 boxes kept, the 7 x 4 one dropped
    assert largest["box"][0].tolist() == [40.0, 30.0, 57.0, 37.0]


def test_label_types_and_shapes():
    label = two_label_map()
    ref = BoxPromptd(per="component")({"label": label})["box"]
    for lab in (torch.as_tensor(label), MetaTensor(torch.as_tensor(label)), label[0], label.astype(np.float32)):
        assert torch.equal(BoxPromptd(per="component")({"label": lab})["box"], ref)


def test_empty_target_never_crashes():
    empty = np.zeros((1, 32, 48), dtype=np.uint8)
    for per in ("mask", "label", "component"):
        out = BoxPromptd(per=per, jitter=0.2)({"label": empty})
        assert out["box"].shape == (0, 4) and out["box"].dtype == torch.float32
        assert out["box_label"].shape == (0,) and out["box_label"].dtype == torch.int64
    assert BoxPromptd(per="label", labels=[3])({"label": two_label_map()})["box"].shape == (0, 4)


def test_empty_target_random_box():
    empty = np.zeros((1, 32, 48), dtype=np.uint8)
    t = BoxPromptd(per="mask", jitter=0.1, empty_box="random")
    for seed in range(100):
        out = t.set_random_state(seed)({"label": empty})
        box = out["box"]
        assert box.shape == (1, 4) and out["box_label"].tolist() == [0]
        x0, y0, x1, y1 = box[0].tolist()
        assert 0 <= x0 <= x1 <= 47 and 0 <= y0 <= y1 <= 31
        assert 0.05 * 48 - 1e-4 <= x1 - x0 <= 0.5 * 48 + 1e-4
        assert 0.05 * 32 - 1e-4 <= y1 - y0 <= 0.5 * 32 + 1e-4
    a = t.set_random_state(1)({"label": empty})["box"]
    assert torch.equal(a, t.set_random_state(1)({"label": empty})["box"])
    # a non-empty target is unaffected by empty_box
    assert BoxPromptd(empty_box="random")({"label": two_label_map()})["box"].tolist() == [[3.0, 2.0, 57.0, 37.0]]


def test_argument_checks():
    with pytest.raises(ValueError, match="per"):
        BoxPromptd(per="pixel")
    with pytest.raises(ValueError, match="one label key"):
        BoxPromptd(keys=("label", "other"))
    with pytest.raises(ValueError, match="empty_box"):
        BoxPromptd(empty_box="zeros")
    with pytest.raises(ValueError, match="H x W"):
        BoxPromptd()({"label": np.zeros((2, 8, 8))})
    with pytest.raises(ValueError, match="jitter mode"):
        jitter_box([0, 0, 1, 1], 1.0, mode="percent")
    out = BoxPromptd(allow_missing_keys=True)({"image": np.zeros((1, 4, 4))})
    assert "box" not in out


def test_user_boxes_come_from_the_neighbouring_slice_or_the_roi_projection():
    from samparser_monai.transforms import UserBoxPromptd

    label = torch.zeros(1, 20, 20)
    label[0, 5:9, 6:10] = 1  # tight box (6, 5, 9, 8)
    neighbours = torch.zeros(2, 20, 20)
    neighbours[1, 4:12, 3:15] = 1  # the next slice's object: box (3, 4, 14, 11)
    sample = {"label": label, "box": torch.tensor([[6.0, 5.0, 9.0, 8.0]]), "neighbours": neighbours,
              "roi_box": torch.tensor([2.0, 2.0, 16.0, 13.0])}  # fmt: skip
    neighbour = UserBoxPromptd(probabilities={"neighbour": 1.0}, margin=0.25)(dict(sample))
    assert neighbour["box"].tolist() == [[0.0, 2.0, 17.0, 13.0]], "the next slice's box, grown by a quarter"
    assert "neighbours" not in neighbour and "roi_box" not in neighbour
    roi = UserBoxPromptd(probabilities={"roi": 1.0}, pad=1)(dict(sample))
    assert roi["box"].tolist() == [[1.0, 1.0, 17.0, 14.0]]
    tight = UserBoxPromptd(probabilities={"tight": 1.0})(dict(sample))
    assert tight["box"].tolist() == [[6.0, 5.0, 9.0, 8.0]]
    mixed = UserBoxPromptd()
    mixed.set_random_state(0)
    drawn = {tuple(mixed(dict(sample))["box"][0].tolist()) for _ in range(30)}
    assert len(drawn) == 3, "a third of each kind"
    with pytest.raises(ValueError, match="probabilities must weigh"):
        UserBoxPromptd(probabilities={"clicks": 1.0})
    from samparser_monai.transforms import slice_transforms

    swaps = {name: [t for t in slice_transforms(20, box_protocol=name).transforms if isinstance(t, UserBoxPromptd)]
             for name in ("tight", "user", "neighbour")}  # fmt: skip
    assert swaps["tight"] == [] and swaps["user"][0].names == ["tight", "neighbour", "roi"]
    assert swaps["neighbour"][0].names == ["tight", "neighbour"] and swaps["neighbour"][0].weights == [0.5, 0.5]
    with pytest.raises(ValueError, match="Unknown box protocol 'clicks'"):
        slice_transforms(20, box_protocol="clicks")
