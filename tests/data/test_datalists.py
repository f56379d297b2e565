# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Datalists: MSD, folder pairs, 2D folders; the split is by case and deterministic."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from samparser_monai.data import case_id, folder_datalist, image_folder_datalist, msd_datalist, split_by_case

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data not found at {SHARED_DATA}")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("a/hippocampus_001.nii.gz", "hippocampus_001"),
        ("b/x.png", "x"),
        ("c/ct.v1.nrrd", "ct.v1"),
        ("dicom_dir", "dicom_dir"),
    ],
)
def test_case_id(name, expected):
    assert case_id(name) == expected


def test_split_is_by_case_deterministic_and_order_free():
    items = [{"image": f"img_{c}_{s}.png", "case": f"patient{c}"} for c in range(20) for s in range(5)]
    train, val = split_by_case(items, val_fraction=0.2, seed=3)
    train_cases, val_cases = {d["case"] for d in train}, {d["case"] for d in val}
    assert not train_cases & val_cases, "a case may not be on both sides"
    assert len(val_cases) == 4 and len(train) + len(val) == len(items)
    again_train, again_val = split_by_case(list(reversed(items)), val_fraction=0.2, seed=3)
    assert {d["case"] for d in again_val} == val_cases
    assert {d["case"] for d in split_by_case(items, 0.2, seed=4)[1]} != val_cases
    assert len({d["case"] for d in split_by_case(items[:10], 0.2)[1]}) == 1, "two cases or more: at least one val"
    with pytest.raises(ValueError, match="val_fraction must be in"):
        split_by_case(items, 1.0)


def test_folder_datalist_pairs_by_case(tmp_path, caplog):
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.nii.gz").touch()
    (tmp_path / "labels").mkdir()
    for name in ("a_seg", "b_seg", "z_seg"):
        (tmp_path / "labels" / f"{name}.nii.gz").touch()
    with caplog.at_level(logging.WARNING):
        items = folder_datalist(str(tmp_path / "*.nii.gz"), str(tmp_path / "labels" / "*.nii.gz"), label_suffix="_seg")
    assert [d["case"] for d in items] == ["a", "b"]
    assert items[0]["label"].endswith("a_seg.nii.gz")
    assert "c, z" in caplog.text
    with pytest.raises(ValueError, match="No image/label pairs"):
        folder_datalist(str(tmp_path / "*.nii.gz"), str(tmp_path / "nothing" / "*.nii.gz"))


def test_msd_datalist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        msd_datalist(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="has no dataset.json"):
        msd_datalist(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"training": []}))
    with pytest.raises(ValueError, match="is empty"):
        msd_datalist(tmp_path)


@needs_shared
def test_msd_hippocampus_datalist():
    items = msd_datalist(SHARED_DATA / "msd_hippocampus")
    assert len(items) == 130
    assert items[0]["case"] == "hippocampus_001"
    assert all(Path(d["image"]).is_file() and Path(d["label"]).is_file() for d in items)


@needs_shared
def test_2d_folders_with_one_and_several_masks_per_image():
    kvasir = image_folder_datalist(
        SHARED_DATA / "kvasir_seg_sample" / "images", SHARED_DATA / "kvasir_seg_sample" / "masks"
    )
    assert len(kvasir) == 5 and all(d["image"].endswith(".jpg") and d["label"].endswith(".png") for d in kvasir)
    sammed = image_folder_datalist(SHARED_DATA / "sammed2d_demo" / "images", SHARED_DATA / "sammed2d_demo" / "masks")
    assert len(sammed) == 30 and len({d["case"] for d in sammed}) == 4
    assert all(d["name"].startswith(d["case"] + "_") for d in sammed)
