# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Resize-longest-side + pad: exact label inversion, Invertd on predictions, box scaling and types."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor, decollate_batch
from monai.transforms import Compose, Invertd

from samparser_monai.networks.sam import SamParser
from samparser_monai.transforms import (
    BoxPromptd,
    ResizeLongestPadd,
    mask_to_box,
    resize_longest_pad,
    resized_size,
    scale_box,
    undo_resize_longest_pad,
)

ODD_SIZES = [(37, 50), (50, 37), (101, 33), (33, 101), (255, 7), (7, 255), (1, 9), (129, 128), (256, 255)]


def random_label(shape, seed, n_labels=5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_labels, size=(1, *shape), dtype=np.int64)


@pytest.mark.parametrize("h, w", ODD_SIZES + [(512, 300), (1000, 1024)])
def test_resized_size_matches_samparser_rounding(h, w):
    size, scale = resized_size(h, w, 256)
    assert size == SamParser._resized(SimpleNamespace(image_size=256), h, w)
    assert max(size) == 256 and scale == 256 / max(h, w)


@pytest.mark.parametrize("h, w", ODD_SIZES)
def test_label_upscale_inverts_exactly(h, w):
    label = random_label((h, w), seed=h * 1000 + w)
    t = ResizeLongestPadd("label", 256, mode="nearest-exact")
    out = t({"label": label})
    (rh, rw), _ = resized_size(h, w, 256)
    assert out["label"].shape == (1, 256, 256) and out["label"].dtype == torch.int64
    assert (out["label"][:, rh:] == 0).all() and (out["label"][:, :, rw:] == 0).all()
    back = t.inverse(out)["label"]
    assert back.shape == (1, h, w) and back.dtype == torch.int64
    np.testing.assert_array_equal(back.numpy(), label)
    assert back.applied_operations == []
    # the plain functions agree
    resized, info = resize_longest_pad(label, 256, "nearest-exact")
    assert isinstance(resized, np.ndarray) and info["orig_size"] == (h, w) and info["resized_size"] == (rh, rw)
    np.testing.assert_array_equal(resized, out["label"].numpy())
    np.testing.assert_array_equal(undo_resize_longest_pad(resized, info, "nearest-exact"), label)


@pytest.mark.parametrize("h, w", [(300, 517), (517, 300)])
def test_downscale_round_trip_shapes(h, w):
    image = torch.rand(3, h, w)
    t = ResizeLongestPadd(("image", "label"), 128)
    out = t({"image": image, "label": random_label((h, w), 0)})
    assert out["image"].shape == (3, 128, 128) and out["image"].dtype == torch.float32
    back = t.inverse(out)
    assert back["image"].shape == (3, h, w) and back["label"].shape == (1, h, w)
    assert back["label"].dtype == torch.int64


def test_constant_image_and_zero_padding():
    out, info = resize_longest_pad(torch.full((1, 40, 90), 0.7), 64, "bilinear")
    h, w = info["resized_size"]
    assert (h, w) == (28, 64)
    torch.testing.assert_close(out[:, :h, :w], torch.full((1, h, w), 0.7))
    assert (out[:, h:] == 0).all()


@pytest.mark.parametrize("nearest_interp", [True, False])
@pytest.mark.parametrize("h, w", [(37, 50), (50, 37), (201, 64)])
def test_invertd_on_predictions(h, w, nearest_interp):
    label = random_label((h, w), seed=3, n_labels=2)
    image = MetaTensor(torch.rand(1, h, w), meta={"filename_or_obj": "case_001.png"})
    pre = Compose([ResizeLongestPadd(("image", "label"), 256)])
    item = pre({"image": image, "label": label})
    assert item["image"].meta["filename_or_obj"] == "case_001.png"
    # a "prediction" on the padded grid: the resized label as probabilities of 2 classes; Invertd needs a
    # MetaTensor prediction (a network's output on MetaTensor input is one), a plain tensor is skipped with a warning
    fg = item["label"].as_tensor().float()
    item["pred"] = MetaTensor(torch.cat([1 - fg, fg]))
    post = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=nearest_interp)
    pred = post(item)["pred"]
    assert pred.shape == (2, h, w)
    if nearest_interp:  # "nearest" is done as pixel-centred "nearest-exact": exact
        np.testing.assert_array_equal(pred[1].numpy(), label[0])
    else:  # bilinear: the argmax recovers the label away from edges
        agreement = (pred.argmax(0).numpy() == label[0]).mean()
        assert agreement > 0.8
    torch.testing.assert_close(pred.affine, image.affine)
    assert pred.meta["filename_or_obj"] == "case_001.png"


def test_invertd_after_batching_and_decollate():
    shapes = [(37, 50), (37, 50)]
    items = [{"image": torch.rand(1, *s), "label": random_label(s, seed=i)} for i, s in enumerate(shapes)]
    pre = Compose([ResizeLongestPadd(("image", "label"), 64)])
    batch = next(iter(DataLoader(Dataset(items, transform=pre), batch_size=2, num_workers=0)))
    assert batch["image"].shape == (2, 1, 64, 64)
    batch["pred"] = batch["label"].float()
    post = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True)
    for item, source in zip(decollate_batch(batch), items):
        pred = post(item)["pred"]
        np.testing.assert_array_equal(pred.numpy().astype(np.int64), source["label"])


def test_box_round_trip_and_agreement_with_resized_mask():
    for (h, w), seed in zip(ODD_SIZES[:6] + [(400, 300), (300, 400)], range(100)):
        rng = np.random.default_rng(seed)
        mask = np.zeros((1, h, w), dtype=np.uint8)
        r0, c0 = rng.integers(0, h), rng.integers(0, w)
        r1, c1 = rng.integers(r0, h), rng.integers(c0, w)
        mask[0, r0 : r1 + 1, c0 : c1 + 1] = 1
        box = mask_to_box(mask)[None]
        t = ResizeLongestPadd("label", 256, mode="nearest-exact")
        out = t({"label": mask, "box": box})
        info = {"orig_size": (h, w), "resized_size": resized_size(h, w, 256)[0]}
        torch.testing.assert_close(out["box"], scale_box(box, info))
        torch.testing.assert_close(scale_box(out["box"], info, inverse=True), box, atol=1e-4, rtol=0)
        torch.testing.assert_close(t.inverse(out)["box"], box, atol=1e-4, rtol=0)
        scale = 256 / max(h, w)
        from_resized = mask_to_box(out["label"])[None]
        assert (from_resized - out["box"]).abs().max() <= max(1.0, scale)


def test_box_scale_factors_and_types():
    info = {"orig_size": (50, 100), "resized_size": (128, 256)}
    box = np.array([[10.0, 20.0, 30.0, 40.0]], dtype=np.float64)
    scaled = scale_box(box, info)
    assert isinstance(scaled, np.ndarray) and scaled.dtype == np.float64
    np.testing.assert_allclose(scaled, [[25.6, 51.2, 76.8, 102.4]])
    listed = scale_box([10, 20, 30, 40], info)
    assert isinstance(listed, torch.Tensor) and listed.dtype == torch.float32


def test_types_meta_and_affine():
    meta = MetaTensor(torch.rand(1, 30, 45), meta={"filename_or_obj": "x.png"})
    for img in (meta, meta.as_tensor(), meta.numpy()):
        out = ResizeLongestPadd("image", 90, mode="bilinear")({"image": img})["image"]
        assert isinstance(out, MetaTensor) and out.shape == (1, 90, 90)
        assert len(out.applied_operations) == 1
    out = ResizeLongestPadd("image", 90)({"image": meta})["image"]
    assert out.meta["filename_or_obj"] == "x.png"
    assert meta.shape == (1, 30, 45) and meta.applied_operations == []  # input untouched
    torch.testing.assert_close(out.affine[0, 0].item(), 0.5)  # 45 -> 90 columns: half the spacing
    torch_out, _ = resize_longest_pad(torch.rand(2, 1, 30, 45), 90)  # plain function: any leading axes
    assert type(torch_out) is torch.Tensor and torch_out.shape == (2, 1, 90, 90)


def test_argument_checks():
    with pytest.raises(ValueError, match="mode"):
        ResizeLongestPadd(("image", "label"), 64, mode=("bilinear",))
    with pytest.raises(ValueError, match="interpolation mode"):
        ResizeLongestPadd("image", 64, mode="linear")
    with pytest.raises(ValueError, match="earlier key"):
        ResizeLongestPadd(("image", "label"), 64)({"image": np.zeros((1, 8, 8)), "label": np.zeros((1, 8, 9))})
    with pytest.raises(ValueError, match="C x H x W"):
        ResizeLongestPadd("image", 64)({"image": np.zeros((8, 8))})
    with pytest.raises(ValueError, match="need an image key"):
        ResizeLongestPadd("image", 64)({"box": torch.zeros(1, 4)})
    with pytest.raises(ValueError, match="64 x 64"):
        undo_resize_longest_pad(torch.zeros(1, 32, 32), {"orig_size": (8, 8), "resized_size": (64, 64)})
    # missing keys are allowed by default: inference without a label
    assert ResizeLongestPadd(("image", "label"), 64)({"image": np.zeros((1, 8, 8))})["image"].shape == (1, 64, 64)


def test_compose_with_box_prompts():
    label = np.zeros((1, 37, 50), np.int64)
    label[0, 5:20, 10:30] = 1
    pre = Compose([BoxPromptd(per="mask"), ResizeLongestPadd(("image", "label"), 256)])
    out = pre({"image": np.random.rand(1, 37, 50).astype(np.float32), "label": label})
    assert out["box"].shape == (1, 4) and out["image"].shape == (1, 256, 256)
    assert (mask_to_box(out["label"]) - out["box"][0]).abs().max() <= 256 / 50


def test_training_slices_leave_as_plain_tensors():
    """``track_meta=False`` (the bundle's training) gives plain tensors with the same values, collated as such."""
    from samparser_monai.transforms import slice_transforms

    label = np.zeros((1, 37, 50), np.float32)
    label[0, 5:20, 10:30] = 1
    item = {"image": torch.rand(1, 37, 50), "label": torch.as_tensor(label)}
    tracked = slice_transforms(64, jitter=0.0)(dict(item))
    plain = slice_transforms(64, jitter=0.0, track_meta=False)(dict(item))
    assert isinstance(tracked["image"], MetaTensor)
    for key in ("image", "label"):
        assert type(plain[key]) is torch.Tensor
        assert torch.equal(plain[key], tracked[key].as_tensor())
    batch = next(iter(DataLoader(Dataset([item] * 2, slice_transforms(64, track_meta=False)), batch_size=2)))
    assert type(batch["image"]) is torch.Tensor and batch["image"].shape == (2, 1, 64, 64)
