# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""DICOM series / DICOM-SEG I/O on the dcmqi 3-slice CT fixture, plus every error on data generated in tmp_path."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from monai.transforms import LoadImaged
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

from samparser_monai.data.dicom import (
    DicomError,
    DicomSeriesReader,
    load_dicom_seg_label,
    read_dicom_seg,
    read_dicom_series,
    sitk_to_ras_affine,
)

FIXTURE = Path(__file__).resolve().parents[3] / "shared" / "data" / "dcmqi_ct3slice_liver_seg"
SERIES = FIXTURE / "dicom"
SEG = FIXTURE / "seg" / "liver_seg.dcm"
LIVER_NRRD = FIXTURE / "nrrd" / "liver_seg.nrrd"

needs_fixture = pytest.mark.skipif(
    not (SERIES.is_dir() and SEG.is_file() and LIVER_NRRD.is_file()),
    reason=f"DICOM fixture {FIXTURE} (CT series, DICOM-SEG, NRRD) is not available on this machine",
)


@pytest.fixture(scope="module")
def ct() -> sitk.Image:
    """The fixture's CT series as SimpleITK reads it."""
    return read_dicom_series(SERIES)


def write_slices(folder: Path, count: int, skip: tuple[int, ...] = ()) -> Path:
    """Write ``count`` copies of the first CT slice 1 mm apart (one series), leaving out the indices in ``skip``."""
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(SERIES / "01.dcm")
    series_uid = generate_uid()
    z0 = float(template.ImagePositionPatient[2])
    for k in range(count):
        if k in skip:
            continue
        ds = pydicom.dcmread(SERIES / "01.dcm")
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], f"{z0 - k:.6f}"]
        ds.SliceLocation = f"{z0 - k:.6f}"
        ds.InstanceNumber = k + 1
        ds.save_as(folder / f"slice_{k:02d}.dcm")
    return folder


def write_two_series(folder: Path) -> tuple[Path, str]:
    """Copy the CT series into ``folder`` and add a copy of it under a new SeriesInstanceUID (returned)."""
    shutil.copytree(SERIES, folder)
    other_uid = generate_uid()
    for source in sorted(SERIES.glob("*.dcm")):
        ds = pydicom.dcmread(source)
        ds.SeriesInstanceUID = other_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / f"other_{source.name}")
    return folder, other_uid


@needs_fixture
def test_series_geometry(ct):
    assert ct.GetSize() == (512, 512, 3)
    np.testing.assert_allclose(ct.GetSpacing(), (0.810547, 0.810547, 1.0), atol=1e-6)
    # GDCM sorts by position: the origin is the most inferior slice (03.dcm), z grows with the index
    np.testing.assert_allclose(ct.GetOrigin(), (-235.199997, -226.800003, -128.690002), atol=1e-6)
    np.testing.assert_allclose(ct.GetDirection(), np.eye(3).ravel())


@needs_fixture
@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")  # MONAI builds its default readers too
def test_reader_and_load_imaged(ct):
    reader = DicomSeriesReader()
    assert reader.verify_suffix(str(SERIES)) and not reader.verify_suffix(str(SEG))
    array, meta = reader.get_data(reader.read(SERIES))
    assert array.shape == (512, 512, 3)
    np.testing.assert_array_equal(array, sitk.GetArrayFromImage(ct).T)
    np.testing.assert_array_equal(meta["spatial_shape"], (512, 512, 3))
    assert meta["space"] == "RAS" and np.isnan(meta["original_channel_dim"])
    assert meta["filename_or_obj"] == str(SERIES)
    np.testing.assert_allclose(meta["affine"], sitk_to_ras_affine(ct))
    np.testing.assert_allclose(meta["original_affine"], meta["affine"])
    stacked, stacked_meta = reader.get_data(reader.read([SERIES, SERIES]))  # folders as channels, like MONAI's readers
    assert stacked.shape == (2, 512, 512, 3) and stacked_meta["original_channel_dim"] == 0

    for reader_arg in (DicomSeriesReader(), "samparser_monai.data.dicom.DicomSeriesReader"):
        item = LoadImaged(keys="image", reader=reader_arg)({"image": str(SERIES)})
        image = item["image"]
        assert tuple(image.shape) == (512, 512, 3)
        np.testing.assert_array_equal(image.numpy(), array)
        np.testing.assert_allclose(image.affine.numpy(), meta["affine"], atol=1e-6)
        assert image.meta["filename_or_obj"] == str(SERIES)
    channel_first = LoadImaged(keys="image", reader=DicomSeriesReader(), ensure_channel_first=True)
    assert tuple(channel_first({"image": str(SERIES)})["image"].shape) == (1, 512, 512, 3)


@needs_fixture
def test_affine_matches_nibabel(ct, tmp_path):
    nifti = tmp_path / "ct.nii.gz"
    sitk.WriteImage(ct, str(nifti))
    loaded = nib.load(nifti)
    np.testing.assert_allclose(sitk_to_ras_affine(ct), loaded.affine, atol=1e-4)
    _, meta = DicomSeriesReader().get_data(read_dicom_series(SERIES))
    np.testing.assert_allclose(meta["affine"], loaded.affine, atol=1e-4)
    # RAS convention on this axial LPS-identity series: x and y axes point to -R and -A
    np.testing.assert_allclose(np.diag(meta["affine"])[:3], (-0.810547, -0.810547, 1.0), atol=1e-6)


def test_ras_affine_oblique_matches_nibabel(tmp_path):
    image = sitk.Image(4, 5, 6, sitk.sitkUInt8)
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    rotation = sitk.Euler3DTransform((0, 0, 0), 0.3, -0.2, 0.5).GetMatrix()
    image.SetDirection(rotation)
    sitk.WriteImage(image, str(tmp_path / "oblique.nii.gz"))
    np.testing.assert_allclose(sitk_to_ras_affine(image), nib.load(tmp_path / "oblique.nii.gz").affine, atol=1e-4)


@needs_fixture
def test_seg_matches_nrrd_voxel_for_voxel(ct):
    labels, names = read_dicom_seg(SEG, ct)
    assert names == {1: "Liver"}
    assert labels.shape == (3, 512, 512) and set(np.unique(labels)) == {0, 1}

    nrrd = sitk.ReadImage(str(LIVER_NRRD))
    # the NRRD is on the series grid up to the DICOM decimal rounding (origin -235.2 vs -235.199997, dz 1 vs 1 - 7e-15)
    assert nrrd.GetSize() == ct.GetSize()
    np.testing.assert_allclose(nrrd.GetSpacing(), ct.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(nrrd.GetOrigin(), ct.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(nrrd.GetDirection(), ct.GetDirection(), atol=1e-6)
    expected = sitk.GetArrayFromImage(nrrd) > 0
    np.testing.assert_array_equal(labels > 0, expected)

    label_xyz, affine = load_dicom_seg_label(SEG, SERIES)
    np.testing.assert_array_equal(label_xyz > 0, expected.T)
    np.testing.assert_allclose(affine, sitk_to_ras_affine(ct))


@needs_fixture
def test_fractional_seg_with_shuffled_frames(ct, tmp_path):
    """A FRACTIONAL copy with reversed frames and sub-threshold noise rasterises to the same mask."""
    ds = pydicom.dcmread(SEG)
    frames = ds.pixel_array.astype(np.uint8)[::-1]
    fractional = np.where(frames > 0, 200, 0).astype(np.uint8)
    fractional[:, :5, :5] = 127  # below half of 255: background
    ds.PerFrameFunctionalGroupsSequence = pydicom.Sequence(list(ds.PerFrameFunctionalGroupsSequence)[::-1])
    ds.SegmentationType = "FRACTIONAL"
    ds.SegmentationFractionalType = "PROBABILITY"
    ds.MaximumFractionalValue = 255
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = fractional.tobytes()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(tmp_path / "fractional.dcm")

    labels, _ = read_dicom_seg(tmp_path / "fractional.dcm", ct)
    expected, _ = read_dicom_seg(SEG, ct)
    np.testing.assert_array_equal(labels, expected)


@needs_fixture
def test_several_series_in_one_folder(tmp_path):
    folder, other_uid = write_two_series(tmp_path / "mixed")
    original_uid = pydicom.dcmread(SERIES / "01.dcm").SeriesInstanceUID
    with pytest.raises(DicomError, match="holds 2 series") as info:
        read_dicom_series(folder)
    assert original_uid in str(info.value) and other_uid in str(info.value) and "series_uid" in str(info.value)
    assert read_dicom_series(folder, series_uid=other_uid).GetSize() == (512, 512, 3)
    with pytest.raises(DicomError, match="no series with SeriesInstanceUID"):
        read_dicom_series(folder, series_uid="1.2.3")


@needs_fixture
@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")
def test_load_imaged_does_not_fall_back(tmp_path):
    """LoadImage swallows errors of read() and tries its own readers, whose PydicomReader stacks both series."""
    folder, other_uid = write_two_series(tmp_path / "mixed")
    with pytest.raises(DicomError, match="holds 2 series"):
        LoadImaged(keys="image", reader=DicomSeriesReader())({"image": str(folder)})
    image = LoadImaged(keys="image", reader=DicomSeriesReader(series_uid=other_uid))({"image": str(folder)})["image"]
    assert tuple(image.shape) == (512, 512, 3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LoadImaged(keys="image", reader=DicomSeriesReader())({"image": str(tmp_path / "nowhere")})


@needs_fixture
def test_missing_slice(tmp_path):
    complete = read_dicom_series(write_slices(tmp_path / "complete", 5))
    assert complete.GetSize() == (512, 512, 5)
    np.testing.assert_allclose(complete.GetSpacing()[2], 1.0, atol=1e-5)
    with pytest.raises(DicomError, match=r"not evenly spaced.*-129\.6900 to -127\.6900.*gap 2\.0000 mm.*1\.0000 mm"):
        read_dicom_series(write_slices(tmp_path / "gap", 5, skip=(2,)))


@needs_fixture
def test_not_a_seg(ct):
    with pytest.raises(DicomError, match="Modality 'CT', not 'SEG'"):
        read_dicom_seg(SERIES / "01.dcm", ct)


@needs_fixture
def test_seg_on_another_grid(ct):
    smaller = sitk.Image(256, 256, 3, sitk.sitkInt16)
    smaller.SetOrigin(ct.GetOrigin())
    smaller.SetSpacing(ct.GetSpacing())
    with pytest.raises(
        DicomError, match="not on the reference series' pixel grid.*512 rows x 512 columns vs 256 x 256"
    ):
        read_dicom_seg(SEG, smaller)


@needs_fixture
@pytest.mark.parametrize("shift_mm", [0.5, -10.0], ids=["between_slices", "outside_the_grid"])
def test_seg_frame_off_the_grid(ct, shift_mm):
    moved = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
    moved.CopyInformation(ct)
    origin = list(ct.GetOrigin())
    origin[2] += shift_mm
    moved.SetOrigin(origin)
    with pytest.raises(DicomError, match=r"Frame \d of DICOM-SEG .* at position .* is not on a slice"):
        read_dicom_seg(SEG, moved)


def test_missing_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_dicom_series(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomError, match="holds no DICOM image series"):
        read_dicom_series(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_dicom_seg(tmp_path / "nowhere.dcm", sitk.Image(2, 2, 2, sitk.sitkUInt8))


@needs_fixture
def test_truncated_slice(tmp_path):
    """GDCM silently leaves a truncated slice out of the series; the reader must not."""
    folder = tmp_path / "truncated"
    shutil.copytree(SERIES, folder)
    data = (folder / "02.dcm").read_bytes()
    (folder / "02.dcm").write_bytes(data[: len(data) - 100_000])  # pixel data cut short
    assert len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))) == 2
    with pytest.raises(DicomError, match=r"02\.dcm' belongs to series .* cannot be read"):
        read_dicom_series(folder)


@needs_fixture
def test_undecodable_slice(tmp_path):
    folder = tmp_path / "undecodable"
    shutil.copytree(SERIES, folder)
    ds = pydicom.dcmread(folder / "02.dcm")
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(200)])  # a JPEG 2000 start marker and garbage
    ds["PixelData"].VR = "OB"
    ds.save_as(folder / "02.dcm")
    with pytest.raises(DicomError, match=r"02\.dcm' of series .* cannot be decoded"):
        read_dicom_series(folder)
