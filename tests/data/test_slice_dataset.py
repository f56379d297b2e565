# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""SliceDataset on generated volumes with known geometry: samples, background, skips, errors, workers."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader
from monai.transforms import Compose, LoadImaged, Orientationd

from samparser_monai.data import SliceDataset
from samparser_monai.transforms.checks import CheckVolumePaird

KEYS = ["image", "label"]


def _volume_transform() -> Compose:
    return Compose(
        [
            LoadImaged(keys=KEYS, ensure_channel_first=True, image_only=True),
            CheckVolumePaird(),
            Orientationd(keys=KEYS, axcodes="RAS", labels=None),
        ]
    )


def _write(path, array, affine=None) -> str:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return str(path)


def _case(tmp_path, name: str, label: np.ndarray | None = None, **kwargs) -> dict:
    shape = (40, 30, 20)
    rng = np.random.default_rng(0)
    image = (rng.random(shape) * 1000).astype(np.float32)
    if label is None:
        label = np.zeros(shape, np.uint8)
        label[10:14, 5:9, 5:10] = 1  # label 1: 16 voxels on axial slices 5..9
        label[20:22, 10:12, 8:13] = 2  # label 2: 4 voxels on axial slices 8..12
    return {
        "image": _write(tmp_path / f"{name}.nii.gz", image, kwargs.get("affine")),
        "label": _write(tmp_path / f"{name}_label.nii.gz", label, kwargs.get("label_affine")),
        "case": name,
    }


def test_samples_are_the_foreground_slices_of_each_label(tmp_path):
    data = [_case(tmp_path, "a")]
    ds = SliceDataset(data, _volume_transform(), axis=2, min_pixels=1, progress=False)
    assert sorted((s, lab) for _, s, lab in ds.samples) == sorted(
        [(s, 1) for s in range(5, 10)] + [(s, 2) for s in range(8, 13)]
    )
    item = ds[0]
    assert item["image"].shape == item["label"].shape == (1, 40, 30)
    assert item["label"].dtype == torch.float32 and set(item["label"].unique().tolist()) == {0.0, 1.0}
    assert item["label"].sum() == 16 and item["label_id"] == 1 and item["case"] == "a" and item["slice"] == 5
    assert SliceDataset(data, _volume_transform(), min_pixels=5, progress=False).label_counts() == {1: 5}
    sagittal = SliceDataset(data, _volume_transform(), axis=0, progress=False)
    assert sagittal.label_counts() == {1: 4, 2: 2} and sagittal[0]["image"].shape == (1, 30, 20)
    assert SliceDataset(data, _volume_transform(), labels=[2], progress=False).label_counts() == {2: 5}


def test_background_fraction_adds_empty_slices(tmp_path):
    ds = SliceDataset([_case(tmp_path, "a")], _volume_transform(), background_fraction=0.5, seed=1, progress=False)
    assert ds.label_counts() == {0: 5, 1: 5, 2: 5}
    background = [ds[i] for i, (_, _, lab) in enumerate(ds.samples) if lab == 0]
    assert all(b["label"].sum() == 0 and b["slice"] not in range(5, 13) for b in background)


def test_case_without_foreground_is_skipped_with_a_warning(tmp_path, caplog):
    data = [_case(tmp_path, "empty", label=np.zeros((40, 30, 20), np.uint8)), _case(tmp_path, "a")]
    with caplog.at_level(logging.WARNING):
        ds = SliceDataset(data, _volume_transform(), progress=False)
    assert ds.cases == ["a"] and "Case 'empty' has no foreground" in caplog.text
    with pytest.raises(ValueError, match="No slice of the 1 cases holds 1 or more foreground voxels"):
        SliceDataset(data[:1], _volume_transform(), progress=False)


def test_errors_name_the_case_and_files(tmp_path):
    good = _case(tmp_path, "a")
    corrupt = dict(good, image=str(tmp_path / "corrupt.nii.gz"), case="corrupt")
    (tmp_path / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ValueError, match=r"Case 'corrupt' \(.*corrupt.nii.gz\) could not be prepared"):
        SliceDataset([corrupt], _volume_transform(), progress=False)

    mismatch = dict(good, label=_write(tmp_path / "small_label.nii.gz", np.zeros((40, 30, 19), np.uint8)))
    with pytest.raises(ValueError, match=r"image '.*a.nii.gz' and label '.*small_label.nii.gz' differ in shape"):
        SliceDataset([mismatch], _volume_transform(), progress=False)

    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    moved = _case(tmp_path, "moved", label_affine=shifted)
    with pytest.raises(ValueError, match=r"image '.*moved.nii.gz' and label '.*moved_label.nii.gz' differ in affine"):
        SliceDataset([moved], _volume_transform(), progress=False)

    four_d = dict(good, image=_write(tmp_path / "4d.nii.gz", np.zeros((40, 30, 20, 2), np.float32)))
    with pytest.raises(ValueError, match=r"4d.nii.gz' has shape \(2, 40, 30, 20\) .* expected one 3D volume"):
        SliceDataset([four_d], _volume_transform(), progress=False)

    with pytest.raises(ValueError, match="The datalist is empty"):
        SliceDataset([], _volume_transform())


def test_volumes_are_read_once_and_workers_see_the_same_samples(tmp_path, monkeypatch):
    data = [_case(tmp_path, "a"), _case(tmp_path, "b")]
    calls = []
    transform = _volume_transform()

    def counting(item):
        calls.append(item["case"])
        return transform(item)

    ds = SliceDataset(data, counting, progress=False)
    assert calls == ["a", "b"]
    serial = [ds[i] for i in range(len(ds))]
    assert calls == ["a", "b"], "epochs must not re-read or re-transform volumes"
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    batches = list(loader)
    assert sum(len(b["case"]) for b in batches) == len(ds) == 20
    first = batches[0]
    assert torch.equal(first["image"][0], serial[0]["image"]) and first["label_id"][0] == serial[0]["label_id"]


def test_context_gives_the_neighbouring_targets_and_the_projected_3d_box():
    image = torch.rand(1, 12, 10, 4)
    label = torch.zeros(1, 12, 10, 4, dtype=torch.uint8)
    label[0, 2:6, 3:5, 1] = 2
    label[0, 4:9, 1:7, 2] = 2
    dataset = SliceDataset([{"image": image, "label": label, "case": "c"}], axis=2, context=True, progress=False)
    first = next(dataset[i] for i in range(len(dataset)) if dataset[i]["slice"] == 1)
    assert first["neighbours"].shape == (2, 12, 10)
    assert not first["neighbours"][0].any() and first["neighbours"][1].sum() == 5 * 6, "slice 0 empty, slice 2 next"
    assert first["roi_box"].tolist() == [1.0, 2.0, 6.0, 8.0], "columns 1-6, rows 2-8 over both slices"
    assert "neighbours" not in SliceDataset([{"image": image, "label": label, "case": "c"}], progress=False)[0]


def test_end_slices_add_each_labels_first_empty_slices_with_an_empty_target():
    image = torch.rand(1, 12, 10, 6)
    label = torch.zeros(1, 12, 10, 6, dtype=torch.uint8)
    label[0, 2:6, 3:5, 1:3] = 2  # label 2 on slices 1-2: ends 0 and 3
    label[0, 7:9, 6:8, 5] = 1  # label 1 on the last slice: one end, 4
    data = [{"image": image, "label": label, "case": "c"}]
    plain = SliceDataset(data, axis=2, context=True, progress=False)
    ends = SliceDataset(data, axis=2, context=True, end_slices=True, progress=False)
    added = sorted(set(ends.samples) - set(plain.samples))
    assert added == [(0, 0, 2), (0, 3, 2), (0, 4, 1)]
    end = next(ends[i] for i, sample in enumerate(ends.samples) if sample == (0, 3, 2))
    assert end["label_id"] == 2 and not end["label"].any(), "nothing of the label on its end slice"
    assert end["neighbours"][0].sum() == 4 * 2 and not end["neighbours"][1].any(), "the object is on the slice before"
