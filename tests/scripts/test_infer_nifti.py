# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""samparser-infer as users run it: geometry kept, CSVs written, bad cases skipped and reported."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
AFFINE = np.array([[0.0, 0.8, 0.0, -20.0], [-1.2, 0.0, 0.0, 35.0], [0.0, 0.0, 2.5, -7.0], [0.0, 0.0, 0.0, 1.0]])


def _infer(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "samparser_monai.infer", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


def _rows(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def _generated(folder: Path, name: str, with_label: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    label = np.zeros((30, 24, 12), np.uint8)
    label[8:15, 4:11, 3:9] = 1
    label[18:24, 12:20, 5:10] = 3
    nib.save(nib.Nifti1Image((label * 0.3 + 0.1).astype(np.float32), AFFINE), str(folder / f"{name}.nii.gz"))
    if with_label:
        (folder / "labels").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(label, AFFINE), str(folder / "labels" / f"{name}.nii.gz"))
    return folder / f"{name}.nii.gz"


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data not found at {SHARED_DATA}")
def test_three_hippocampus_cases_with_label_boxes(tmp_path):
    images = sorted((SHARED_DATA / "msd_hippocampus" / "imagesTr").glob("*.nii.gz"))[:3]
    out = tmp_path / "out"
    result = _infer(*map(str, images), "--labels", str(SHARED_DATA / "msd_hippocampus" / "labelsTr"),
                    "--output-dir", str(out), "--qa", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "segmented 3 of 3 cases" in result.stdout and "slices/s" in result.stdout
    for image in images:
        source = nib.load(image)
        written = nib.load(out / image.name.replace(".nii.gz", "_seg.nii.gz"))
        assert written.shape == source.shape
        assert np.allclose(written.affine, source.affine, atol=1e-5)
        reference = nib.load(SHARED_DATA / "msd_hippocampus" / "labelsTr" / image.name).get_fdata()
        assert set(np.unique(written.get_fdata())) <= set(np.unique(reference))
    metrics = _rows(out / "metrics.csv")
    assert sorted((r["case"], r["label"]) for r in metrics) == sorted((i.name[:-7], c) for i in images for c in "12")
    assert all(float(r["dice"]) > 0.5 for r in metrics), "LiteMedSAM zero-shot with tight boxes"
    assert len(list((out / "qa").glob("*.png"))) == 3


def test_bad_cases_are_skipped_and_reported(tmp_path):
    data = tmp_path / "data"
    good = _generated(data, "good")
    unlabelled = _generated(data, "unlabelled", with_label=False)
    corrupt = data / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b not a volume")
    out = tmp_path / "out"
    result = _infer(str(good), str(unlabelled), str(corrupt), "--labels", str(data / "labels"),
                    "--output-dir", str(out), "--backbone", "tiny")  # fmt: skip
    assert result.returncode == 1, "a skipped case makes the run fail"
    summary = {r["case"]: r for r in _rows(out / "summary.csv")}
    assert summary["good"]["status"] == "ok" and Path(summary["good"]["output"]).is_file()
    assert summary["unlabelled"]["status"] == "skipped"
    assert "no reference label map" in summary["unlabelled"]["reason"]
    assert summary["corrupt"]["status"] == "skipped" and summary["corrupt"]["reason"]
    assert "skipped corrupt:" in result.stdout and "skipped unlabelled:" in result.stdout
    written = nib.load(summary["good"]["output"])
    assert written.shape == (30, 24, 12) and np.allclose(written.affine, AFFINE, atol=1e-5)


@pytest.mark.slow
def test_voxel_and_world_json_boxes_give_the_same_label_map(tmp_path):
    image = _generated(tmp_path / "data", "case")
    corners = np.array([[8, 4, 3, 1], [14, 10, 8, 1]], np.float64) @ AFFINE.T
    prompts = {
        "voxel": {"case": [{"label": 1, "box": [8, 4, 3, 14, 10, 8], "space": "voxel"}]},
        "world": {"case": [{"label": 1, "box": [*corners[:, :3].min(0), *corners[:, :3].max(0)], "space": "world"}]},
    }
    maps = {}
    for space, content in prompts.items():
        (tmp_path / f"{space}.json").write_text(json.dumps(content))
        out = tmp_path / space
        result = _infer(str(image), "--prompt", "boxes", "--boxes", str(tmp_path / f"{space}.json"),
                        "--output-dir", str(out), "--backbone", "tiny")  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        maps[space] = nib.load(out / "case_seg.nii.gz").get_fdata()
    assert np.array_equal(maps["voxel"], maps["world"])
    assert maps["voxel"][:, :, :3].sum() == 0 and maps["voxel"][:, :, 9:].sum() == 0, "only slices the box spans"


@pytest.mark.slow
def test_output_folder_checked_before_any_work(tmp_path):
    image = _generated(tmp_path / "data", "case")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = _infer(str(image), "--output-dir", str(blocker / "out"), "--backbone", "tiny")
    assert result.returncode != 0 and "is not writable" in result.stderr
    assert _infer("--help").returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data not found at {SHARED_DATA}")
def test_dicom_series_with_a_world_box(tmp_path):
    """A DICOM CT series in, a NIfTI label map out on the series' own grid; the box comes from the liver DICOM-SEG."""
    from samparser_monai.data import load_dicom_seg_label

    folder = SHARED_DATA / "dcmqi_ct3slice_liver_seg"
    liver, affine = load_dicom_seg_label(folder / "seg" / "liver_seg.dcm", folder / "dicom")  # x, y, z; RAS
    index = np.argwhere(liver > 0)
    lo, hi = index.min(0), index.max(0)
    corners = np.array([[*lo, 1], [*hi, 1]], np.float64) @ affine.T
    box = {"dicom": [{"label": 1, "box": [*corners[:, :3].min(0), *corners[:, :3].max(0)], "space": "world"}]}
    (tmp_path / "boxes.json").write_text(json.dumps(box))
    out = tmp_path / "out"
    result = _infer(str(folder / "dicom"), "--dicom", "--prompt", "boxes", "--boxes", str(tmp_path / "boxes.json"),
                    "--intensity", "ct_abdomen", "--output-dir", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    written = nib.load(out / "dicom_seg.nii.gz")
    assert written.shape == liver.shape and np.allclose(written.affine, affine, atol=1e-4)
    prediction = written.get_fdata() > 0
    dice = 2 * (prediction & (liver > 0)).sum() / (prediction.sum() + (liver > 0).sum())
    assert dice > 0.8, f"LiteMedSAM on the liver with its box: Dice {dice:.3f}"


@pytest.mark.slow
def test_propagation_with_lite_medsam_covers_the_object(tmp_path):
    """One box on the key slice of a generated ellipsoid; the real model carries it through the volume."""
    shape = (64, 64, 24)
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    blob = ((ii - 30) / 14.0) ** 2 + ((jj - 34) / 11.0) ** 2 + ((kk - 12) / 7.0) ** 2 <= 1  # slices 5..19
    rng = np.random.default_rng(0)
    image = (0.25 + 0.5 * blob + 0.03 * rng.standard_normal(shape)).astype(np.float32)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "blob.nii.gz"))
    section = np.argwhere(blob[:, :, 12])
    (i0, j0), (i1, j1) = section.min(0), section.max(0)
    prompts = {"blob": [{"label": 4, "box": [int(i0), int(j0), 12, int(i1), int(j1), 12], "space": "voxel"}]}
    (tmp_path / "key.json").write_text(json.dumps(prompts))
    result = _infer(str(tmp_path / "blob.nii.gz"), "--prompt", "propagate", "--boxes", str(tmp_path / "key.json"),
                    "--output-dir", str(tmp_path / "out"), "--intensity", "unit")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    prediction = nib.load(tmp_path / "out" / "blob_seg.nii.gz").get_fdata()
    assert set(np.unique(prediction)) == {0.0, 4.0}, "the prompt's label id is written"
    predicted_slices = set(np.nonzero((prediction == 4).any(axis=(0, 1)))[0])
    object_slices = set(np.nonzero(blob.any(axis=(0, 1)))[0])
    assert len(predicted_slices & object_slices) >= 0.8 * len(object_slices), (predicted_slices, object_slices)
    dice = 2 * ((prediction == 4) & blob).sum() / ((prediction == 4).sum() + blob.sum())
    assert dice > 0.8, f"Dice {dice:.3f}"
    row = _rows(tmp_path / "out" / "summary.csv")[0]
    assert row["propagation"].startswith(f"label 4: {len(predicted_slices)} slices ("), row["propagation"]
    assert row["warning"] == ""


@pytest.mark.slow
def test_prompt_files_are_checked_against_each_image_and_unmatched_ids_reported(tmp_path):
    """A box outside its image skips that case with the image's extent; case ids with no input are listed."""
    data = tmp_path / "data"
    inside, outside, unprompted = (_generated(data, name, with_label=False) for name in ("inside", "outside", "none"))
    prompts = {
        "inside": [{"label": 1, "box": [8, 4, 3, 14, 10, 8], "space": "voxel"}],
        "outside": [{"label": 1, "box": [40, 40, 3, 50, 50, 8], "space": "voxel"}],
        "typo_case": [{"label": 2, "box": [8, 4, 3, 14, 10, 8], "space": "voxel"}],
    }
    (tmp_path / "rois.json").write_text(json.dumps(prompts))
    out = tmp_path / "out"
    args = ["--prompt", "roi", "--boxes", str(tmp_path / "rois.json"), "--output-dir", str(out), "--backbone", "tiny"]
    result = _infer(str(inside), str(outside), str(unprompted), *args)
    assert result.returncode == 1, "a skipped case makes the run fail"
    summary = {r["case"]: r for r in _rows(out / "summary.csv")}
    assert summary["inside"]["status"] == "ok", summary["inside"]["reason"]
    assert summary["outside"]["status"] == "skipped"
    assert summary["outside"]["reason"].startswith("Prompt box [40, 40, 3, 50, 50, 8] (voxel) lies outside the image")
    assert "voxel extent is [0, 0, 0] to" in summary["outside"]["reason"]
    assert summary["none"]["reason"] == "the prompt file has no prompt for it"
    assert summary["typo_case"]["status"] == "unmatched prompt"
    assert "warning: 1 case id in" in result.stderr and "matches no input: typo_case." in result.stderr
