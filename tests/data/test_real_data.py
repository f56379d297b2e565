# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""The data pipeline on the real data in ../shared/data: MSD hippocampus MRI, DICOM + DICOM-SEG CT, a 2D folder."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch
from monai.data import Dataset
from monai.transforms import Compose

from samparser_monai.data import (
    DicomSeriesReader,
    SliceDataset,
    dicom_datalist,
    image_folder_datalist,
    msd_datalist,
    split_by_case,
)
from samparser_monai.transforms import (
    image_2d_transforms,
    mask_to_box,
    resized_size,
    slice_transforms,
    volume_transforms,
)

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data not found at {SHARED_DATA}")


@pytest.fixture(scope="module")
def hippocampus() -> SliceDataset:
    items = msd_datalist(SHARED_DATA / "msd_hippocampus")
    return SliceDataset(items, volume_transforms("mr"), slice_transforms(256, jitter=0.1), min_pixels=1, progress=False)


def test_every_hippocampus_case_has_foreground_slices_of_both_labels(hippocampus):
    labels_per_case = defaultdict(set)
    for volume, _, label_id in hippocampus.samples:
        labels_per_case[hippocampus.cases[volume]].add(label_id)
    assert len(hippocampus.cases) == 130
    assert all(labels == {1, 2} for labels in labels_per_case.values())
    for image, _ in hippocampus.volumes:  # uint8 and float32 volumes with wild ranges, all normalised
        assert image.min() >= 0.0 and image.max() <= 1.0


def test_hippocampus_samples_have_boxes_inside_the_image_around_the_target(hippocampus):
    hippocampus.slice_transform.set_random_state(0)
    for index in range(0, len(hippocampus), 37):
        item = hippocampus[index]
        assert item["image"].shape == item["label"].shape == (1, 256, 256)
        box = item["box"]
        assert box.shape == (1, 4)
        assert (box >= 0).all() and (box <= 255).all() and (box[0, :2] <= box[0, 2:]).all()
        tight = mask_to_box(item["label"][0] > 0)
        scale = 256 / max(item["label"].applied_operations[-1]["extra_info"]["orig_size"])
        margin = 0.1 * float((tight[2:] - tight[:2]).max()) + scale + 1  # jitter 10% of the box, one source pixel
        assert (box[0] - tight).abs().max() <= margin


def test_hippocampus_split_has_no_shared_case():
    train, val = split_by_case(msd_datalist(SHARED_DATA / "msd_hippocampus"), val_fraction=0.2, seed=0)
    assert len(val) == 26 and not {d["case"] for d in train} & {d["case"] for d in val}


def test_dicom_series_and_seg_align_with_the_nrrd_label_map():
    folder = SHARED_DATA / "dcmqi_ct3slice_liver_seg"
    items = dicom_datalist(folder)
    assert len(items) == 1 and items[0]["label"].endswith("liver_seg.dcm")
    out = volume_transforms("ct_liver", reader=DicomSeriesReader(), label_format="dicom_seg")(items[0])
    image, label = out["image"], out["label"]
    assert image.shape == label.shape == (1, 512, 512, 3)
    assert torch.allclose(image.affine.double(), label.affine.double())
    nrrd = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "nrrd" / "liver_seg.nrrd")))  # z, y, x; LPS grid
    # the series is axial with identity LPS direction: RAS orientation flips x and y of the (x, y, z) array
    expected = torch.as_tensor(nrrd.transpose(2, 1, 0) > 0).flip(0).flip(1)
    assert torch.equal(label[0] > 0, expected)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0


def test_a_2d_folder_loads_with_exact_boxes_at_zero_jitter():
    folder = SHARED_DATA / "kvasir_seg_sample"
    items = image_folder_datalist(folder / "images", folder / "masks")
    pipeline = image_2d_transforms(256, jitter=0.0)
    before_prompts = Compose(pipeline.transforms[:-1])  # loaded, scaled and binarised, at the original size
    for item in Dataset(items, pipeline):
        assert item["image"].shape == (3, 256, 256) and item["label"].shape == (1, 256, 256)
        assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
        assert set(item["label"].unique().tolist()) == {0.0, 1.0}
        original = before_prompts(next(d for d in items if d["image"] == item["image"].meta["filename_or_obj"]))
        height, width = original["label"].shape[-2:]
        (new_h, new_w), _ = resized_size(height, width, 256)
        scale = torch.tensor([new_w / width, new_h / height] * 2)  # per axis, as SAM's ResizeLongestSide
        expected = mask_to_box(original["label"][0] > 0) * scale  # the tight box, scaled like the image
        assert torch.allclose(item["box"][0], expected, atol=1e-3)
