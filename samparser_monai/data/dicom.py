# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""DICOM I/O: one image series per folder, DICOM-SEG rasterised onto it, and a MONAI reader for ``LoadImaged``.

A series is read with SimpleITK (GDCM), after checking that the folder holds exactly one series (or that
``series_uid`` picks one) and that its slices are evenly spaced along the slice normal, so that a missing slice is an
error instead of a silently stretched volume. A DICOM-SEG is read with pydicom and each frame is placed on the
series' voxel grid by its own ``ImagePositionPatient``, which keeps the label map voxel for voxel aligned with the
image whatever order the SEG frames are stored in.

Array orders: SimpleITK's numpy order is ``(z, y, x)``; MONAI readers return ``(x, y, z)``. ``read_dicom_seg``
returns the former (it pairs with a ``SimpleITK.Image``); ``DicomSeriesReader`` and ``load_dicom_seg_label`` return
the latter with a RAS affine, as MONAI's ``ITKReader`` and ``NibabelReader`` do.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ImageReader
from monai.utils import ensure_tuple, optional_import

__all__ = [
    "DicomError",
    "DicomSeriesReader",
    "load_dicom_seg_label",
    "read_dicom_seg",
    "read_dicom_series",
    "sitk_to_ras_affine",
]

# optional at import time: the package imports without them (DICOM is one input format among several); a DICOM
# function used without them raises an OptionalImportError naming the package
pydicom, _ = optional_import("pydicom")
sitk, _ = optional_import("SimpleITK")
InvalidDicomError, _ = optional_import("pydicom.errors", name="InvalidDicomError")

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

# Slices whose gap along the normal differs from the smallest gap by more than this fraction count as missing/uneven.
SPACING_RTOL = 0.1
# A SEG frame must lie within this many voxels of a reference slice (and of the reference's in-plane origin).
POSITION_TOL_VOXELS = 0.1
# Image orientation cosines of the slices (and of a SEG) must agree to within this.
ORIENTATION_ATOL = 1e-4

_FOLDER_KEY = "samparser_monai:folder"


class DicomError(ValueError):
    """DICOM data that cannot be used as asked: several series, missing slices, a mismatched or invalid SEG."""


def _require_folder(folder: PathLike) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"DICOM folder '{path}' does not exist; pass the folder that holds the series' files.")
    return path


def _select_series(folder: Path, series_uid: str | None) -> str:
    series_ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    if not series_ids:
        raise DicomError(
            f"DICOM folder '{folder}' holds no DICOM image series; point it at a folder of DICOM slices of one series."
        )
    if series_uid is not None:
        if series_uid not in series_ids:
            raise DicomError(
                f"DICOM folder '{folder}' has no series with SeriesInstanceUID {series_uid}; "
                f"the series there are: {', '.join(series_ids)}."
            )
        return series_uid
    if len(series_ids) > 1:
        raise DicomError(
            f"DICOM folder '{folder}' holds {len(series_ids)} series ({', '.join(series_ids)}); pass the folder of "
            "one series, or pick one with the series_uid argument."
        )
    return series_ids[0]


def _slice_geometry(folder: Path, files: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """ImagePositionPatient of each file and the common ImageOrientationPatient, or None where a file lacks them."""
    positions, orientations = [], []
    for name in files:
        try:
            ds = pydicom.dcmread(
                name, stop_before_pixels=True, specific_tags=["ImagePositionPatient", "ImageOrientationPatient"]
            )
        except (InvalidDicomError, OSError, ValueError) as err:
            raise DicomError(
                f"DICOM file '{name}' in folder '{folder}' cannot be read ({err}); remove or replace it."
            ) from err
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            return None
        positions.append([float(v) for v in ds.ImagePositionPatient])
        orientations.append([float(v) for v in ds.ImageOrientationPatient])
    orientation = np.asarray(orientations)
    if np.abs(orientation - orientation[0]).max() > ORIENTATION_ATOL:
        raise DicomError(
            f"The slices of the DICOM series in folder '{folder}' do not share one ImageOrientationPatient; "
            "a volume needs parallel slices, so split the series or reslice it."
        )
    return np.asarray(positions), orientation[0]


def _check_slice_spacing(folder: Path, files: Sequence[str]) -> None:
    """Raise a DicomError when the slice positions along the normal are duplicated or not evenly spaced."""
    if len(files) < 3:
        return
    geometry = _slice_geometry(folder, files)
    if geometry is None:
        logger.debug("DICOM series in '%s' has slices without position/orientation; spacing not checked.", folder)
        return
    positions, orientation = geometry
    normal = np.cross(orientation[:3], orientation[3:])
    along = np.sort(positions @ normal)
    gaps = np.diff(along)
    smallest = gaps.min()
    if smallest <= 1e-6:
        at = int(np.argmin(gaps))
        raise DicomError(
            f"DICOM series in folder '{folder}' has two slices at the same position {along[at]:.4f} mm along the "
            "slice normal; it mixes acquisitions, so split them into one folder each."
        )
    uneven = np.flatnonzero(np.abs(gaps - smallest) > SPACING_RTOL * smallest)
    if uneven.size:
        k = int(uneven[0])
        missing = round(gaps[k] / smallest) - 1
        raise DicomError(
            f"DICOM series in folder '{folder}' is not evenly spaced: slices jump from {along[k]:.4f} to "
            f"{along[k + 1]:.4f} mm along the slice normal (gap {gaps[k]:.4f} mm) where the spacing is "
            f"{smallest:.4f} mm, so about {max(missing, 1)} slice(s) are missing there; restore the complete series."
        )


def _check_unlisted_files(folder: Path, series_uid: str, files: Sequence[str]) -> None:
    """Raise a DicomError for a file of the series that GDCM skipped (GDCM silently drops e.g. truncated slices)."""
    listed = {Path(name).resolve() for name in files}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.resolve() in listed:
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue  # not DICOM (a README, a thumbnail...) or not even a readable header: not a slice of ours
        if ds.get("SeriesInstanceUID") == series_uid:
            raise DicomError(
                f"DICOM file '{path}' belongs to series {series_uid} in folder '{folder}' but cannot be read "
                "(truncated or damaged); restore the file or remove it knowingly."
            )


def _first_undecodable(files: Sequence[str]) -> str:
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        try:
            reader.Execute()
        except RuntimeError:
            return name
    return "one of its files"


def read_dicom_series(folder: PathLike, series_uid: str | None = None) -> sitk.Image:
    """Read the DICOM image series in one folder as a 3D SimpleITK image (LPS geometry, ``(x, y, z)`` size).

    Args:
        folder: a folder with the slices of one series (other files in it are ignored by GDCM).
        series_uid: the SeriesInstanceUID to read when the folder holds several series.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        DicomError: no series in the folder; several series and no ``series_uid``; an unknown ``series_uid``;
            a file of the series that GDCM cannot parse (GDCM alone would silently leave it out); slices with
            different orientations, duplicated or unevenly spaced (missing) slices; pixel data that cannot be decoded.
    """
    path = _require_folder(folder)
    uid = _select_series(path, series_uid)
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), uid))
    if not files:
        raise DicomError(f"DICOM folder '{path}' lists series {uid} but none of its files; check the folder's files.")
    _check_unlisted_files(path, uid, files)
    _check_slice_spacing(path, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise DicomError(
            f"DICOM file '{_first_undecodable(files)}' of series {uid} in folder '{path}' cannot be decoded "
            f"({reason}); replace the damaged file or convert the series to an uncompressed transfer syntax."
        ) from err
    return image


def sitk_to_ras_affine(image: sitk.Image) -> np.ndarray:
    """The RAS affine of a SimpleITK image, as MONAI's ``ITKReader`` (``affine_lps_to_ras=True``) and nibabel give it.

    SimpleITK geometry is LPS: ``point = origin + direction @ diag(spacing) @ index``. RAS negates the first two world
    axes, i.e. the first two rows of the affine. Returns a ``(d + 1, d + 1)`` matrix for a ``d``-dimensional image
    (``4 x 4`` for a volume).
    """
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
    affine = np.eye(dim + 1)
    affine[:dim, :dim] = direction @ np.diag(np.asarray(image.GetSpacing(), dtype=np.float64))
    affine[:dim, dim] = np.asarray(image.GetOrigin(), dtype=np.float64)
    flip = np.ones(dim + 1)
    flip[: min(dim, 2)] = -1.0
    return flip[:, None] * affine + 0.0  # + 0.0 turns the -0.0 of flipped zeros into 0.0


def _seg_pixel_spacing(ds: pydicom.Dataset) -> tuple[float, float] | None:
    for groups in (ds.get("SharedFunctionalGroupsSequence"), ds.get("PerFrameFunctionalGroupsSequence")):
        if groups and "PixelMeasuresSequence" in groups[0] and "PixelSpacing" in groups[0].PixelMeasuresSequence[0]:
            row, col = groups[0].PixelMeasuresSequence[0].PixelSpacing
            return float(row), float(col)
    return None


def _seg_orientation(ds: pydicom.Dataset) -> np.ndarray | None:
    for groups in (ds.get("SharedFunctionalGroupsSequence"), ds.get("PerFrameFunctionalGroupsSequence")):
        if groups and "PlaneOrientationSequence" in groups[0]:
            return np.asarray([float(v) for v in groups[0].PlaneOrientationSequence[0].ImageOrientationPatient])
    return None


def _check_seg_grid(seg_file: Path, ds: pydicom.Dataset, reference: sitk.Image) -> None:
    size, spacing = reference.GetSize(), reference.GetSpacing()
    direction = np.asarray(reference.GetDirection()).reshape(3, 3)
    problems = []
    if (int(ds.Rows), int(ds.Columns)) != (size[1], size[0]):
        problems.append(f"{ds.Rows} rows x {ds.Columns} columns vs {size[1]} x {size[0]}")
    pixel_spacing = _seg_pixel_spacing(ds)
    # DICOM PixelSpacing is (between rows = y, between columns = x); SimpleITK spacing is (x, y, z).
    if pixel_spacing is not None and not np.allclose(pixel_spacing, (spacing[1], spacing[0]), rtol=1e-4, atol=1e-5):
        problems.append(f"pixel spacing {pixel_spacing[0]:g} x {pixel_spacing[1]:g} vs {spacing[1]:g} x {spacing[0]:g}")
    orientation = _seg_orientation(ds)
    expected = np.concatenate([direction[:, 0], direction[:, 1]])
    if orientation is not None and np.abs(orientation - expected).max() > ORIENTATION_ATOL:
        problems.append(f"orientation {np.round(orientation, 4).tolist()} vs {np.round(expected, 4).tolist()}")
    if problems:
        raise DicomError(
            f"DICOM-SEG '{seg_file}' is not on the reference series' pixel grid ({'; '.join(problems)}); "
            "pass the series the segmentation was drawn on."
        )


def _seg_frames(seg_file: Path, ds: pydicom.Dataset) -> np.ndarray:
    """The frames of a SEG as a boolean ``(frames, rows, columns)`` array."""
    try:
        frames = np.asarray(ds.pixel_array)
    except Exception as err:  # pydicom raises many types for pixel data it cannot decode
        raise DicomError(f"The pixel data of DICOM-SEG '{seg_file}' cannot be decoded ({err}); re-export it.") from err
    frames = frames.reshape(-1, int(ds.Rows), int(ds.Columns))
    seg_type = str(ds.get("SegmentationType", "BINARY")).upper()
    if seg_type == "BINARY":
        return frames > 0
    if seg_type == "FRACTIONAL":
        maximum = float(ds.get("MaximumFractionalValue", 255))
        return frames >= maximum / 2.0
    raise DicomError(
        f"DICOM-SEG '{seg_file}' has SegmentationType '{seg_type}'; only BINARY and FRACTIONAL can be read."
    )


def read_dicom_seg(seg_file: PathLike, reference: sitk.Image) -> tuple[np.ndarray, dict[int, str]]:
    """Rasterise a DICOM-SEG onto the voxel grid of its reference series.

    Each frame goes to the reference slice at its ``PlanePositionSequence`` position and takes its
    ``ReferencedSegmentNumber`` as value. BINARY frames are used as they are; FRACTIONAL frames are thresholded at
    half of ``MaximumFractionalValue``. Where segments overlap the higher segment number wins (a warning is logged).

    Args:
        seg_file: the DICOM-SEG file.
        reference: the image series the SEG was drawn on, e.g. from :func:`read_dicom_series`.

    Returns:
        The label map in SimpleITK's numpy order ``(z, y, x)`` (as ``SimpleITK.GetArrayFromImage(reference)``) with
        segment numbers as values (0 = background), and the mapping segment number -> segment label.

    Raises:
        FileNotFoundError: ``seg_file`` does not exist.
        DicomError: not a DICOM file or not a SEG; rows, columns, pixel spacing or orientation differ from the
            reference; a frame lies between slices, outside the grid, or lacks its position or segment number.
    """
    path = Path(seg_file)
    if not path.is_file():
        raise FileNotFoundError(f"DICOM-SEG file '{path}' does not exist; pass the path of the .dcm SEG object.")
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError) as err:
        raise DicomError(f"'{path}' is not a readable DICOM file ({err}); pass a DICOM-SEG object.") from err
    modality = ds.get("Modality", "")
    if modality != "SEG":
        raise DicomError(f"'{path}' has Modality '{modality}', not 'SEG'; pass a DICOM-SEG object, not an image.")
    if reference.GetDimension() != 3:
        raise DicomError(f"The reference for DICOM-SEG '{path}' is {reference.GetDimension()}D; pass a 3D series.")
    _check_seg_grid(path, ds, reference)
    frames = _seg_frames(path, ds)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != len(frames):
        raise DicomError(
            f"DICOM-SEG '{path}' has {len(frames)} frames but {len(per_frame)} per-frame functional groups; "
            "re-export it."
        )
    names = {int(item.SegmentNumber): str(item.get("SegmentLabel", "")) for item in ds.get("SegmentSequence", [])}

    size = reference.GetSize()
    direction = np.asarray(reference.GetDirection()).reshape(3, 3)
    to_index = np.linalg.inv(direction @ np.diag(reference.GetSpacing()))
    origin = np.asarray(reference.GetOrigin())
    dtype = np.uint8 if max(names, default=0) < 256 else np.uint16
    labels = np.zeros((size[2], size[1], size[0]), dtype=dtype)
    placed: list[tuple[int, int, np.ndarray]] = []
    for i, (frame, groups) in enumerate(zip(frames, per_frame)):
        try:
            position = np.asarray([float(v) for v in groups.PlanePositionSequence[0].ImagePositionPatient])
            number = int(groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        except (AttributeError, IndexError) as err:
            raise DicomError(
                f"Frame {i} of DICOM-SEG '{path}' lacks its ImagePositionPatient or ReferencedSegmentNumber; "
                "re-export the SEG with per-frame positions."
            ) from err
        index = to_index @ (position - origin)
        slice_index = int(round(index[2]))
        # rows/columns equal the reference's, so a frame must start at the in-plane origin and sit on a slice
        off_grid = max(abs(index[0]), abs(index[1]), abs(index[2] - slice_index)) > POSITION_TOL_VOXELS
        if off_grid or not 0 <= slice_index < size[2]:
            raise DicomError(
                f"Frame {i} of DICOM-SEG '{path}' at position {np.round(position, 4).tolist()} (voxel index "
                f"{np.round(index, 3).tolist()}) is not on a slice of the reference grid of {size[2]} slices; pass "
                "the series the segmentation was drawn on."
            )
        if number not in names:
            names[number] = ""
        placed.append((number, slice_index, frame))
    overlapping = 0
    for number, k, frame in sorted(placed, key=lambda item: item[0]):
        target = labels[k]
        overlapping += int((frame & (target != 0) & (target != number)).sum())
        target[frame] = number
    if overlapping:
        logger.warning("DICOM-SEG '%s' has %d voxels in several segments; the higher number wins.", path, overlapping)
    return labels, dict(sorted(names.items()))


def load_dicom_seg_label(
    seg_file: PathLike, series_folder: PathLike, series_uid: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A DICOM-SEG as a label map aligned voxel for voxel with :class:`DicomSeriesReader`'s image of its series.

    Args:
        seg_file: the DICOM-SEG file.
        series_folder: the folder of the series the SEG was drawn on.
        series_uid: the series to use when the folder holds several.

    Returns:
        The label map in ``(x, y, z)`` order (segment numbers as values) and its RAS affine, equal to the affine
        ``DicomSeriesReader`` gives for the series. See :func:`read_dicom_seg` for the segment labels and errors.
    """
    reference = read_dicom_series(series_folder, series_uid=series_uid)
    labels, _ = read_dicom_seg(seg_file, reference)
    return np.ascontiguousarray(labels.T), sitk_to_ras_affine(reference)


@dataclass(frozen=True)
class _FailedRead:
    """What ``DicomSeriesReader.read`` returns for a folder it cannot read: the error, for ``get_data`` to raise."""

    error: Exception


class DicomSeriesReader(ImageReader):
    """MONAI image reader for a folder holding one DICOM series, for the stock ``LoadImage``/``LoadImaged``.

    Unlike MONAI's ``ITKReader`` on a folder, several series in the folder or missing slices are errors (see
    :func:`read_dicom_series`). ``read`` hands such an error to ``get_data``, which raises it: ``LoadImage`` catches
    errors of ``read`` and falls back to MONAI's own readers (its ``PydicomReader`` silently stacks two series of one
    folder into one volume), but lets errors of ``get_data`` through.

    ``get_data`` follows ``ITKReader`` (``reverse_indexing=False``, ``affine_lps_to_ras=True``): the array is in
    ``(x, y, z)`` order (``(x, y, z, c)`` for colour images), ``affine`` and ``original_affine`` are RAS, ``space`` is
    ``"RAS"``. A list of folders is stacked on a new first (channel) axis, as MONAI's readers do.

    Args:
        series_uid: the SeriesInstanceUID to read when a folder holds several series.

    Example:
        ``LoadImaged(keys="image", reader=DicomSeriesReader())`` on ``{"image": "path/to/series_folder"}``; in a
        bundle config ``"reader": "samparser_monai.data.dicom.DicomSeriesReader"``.
    """

    def __init__(self, series_uid: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.series_uid = series_uid
        if kwargs:
            logger.debug("DicomSeriesReader ignores the arguments %s.", sorted(kwargs))

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """True when every given path is a directory (a DICOM series folder)."""
        names = ensure_tuple(filename)
        return bool(names) and all(Path(name).is_dir() for name in names)

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> Any:
        """Read one series folder, or a list of them, as SimpleITK images (see :func:`read_dicom_series`).

        A folder that cannot be read gives a placeholder holding the error instead of an image; ``get_data`` raises
        that error (see the class docstring for why).
        """
        folders = ensure_tuple(data)
        images: list[sitk.Image | _FailedRead] = []
        for folder in folders:
            try:
                image = read_dicom_series(folder, series_uid=kwargs.get("series_uid", self.series_uid))
            except (DicomError, FileNotFoundError) as err:
                images.append(_FailedRead(err))
                continue
            image.SetMetaData(_FOLDER_KEY, str(folder))
            images.append(image)
        return images if len(folders) > 1 else images[0]

    def get_data(self, img: sitk.Image | Sequence[sitk.Image]) -> tuple[np.ndarray, dict]:
        """The ``(x, y, z)`` array and MONAI meta dict of one image, or of several stacked on a new first axis."""
        arrays, metas = [], []
        images = [img] if isinstance(img, (sitk.Image, _FailedRead)) else list(img)  # a sitk.Image iterates pixels
        for image in images:
            if isinstance(image, _FailedRead):
                raise image.error
            array = sitk.GetArrayFromImage(image)
            spatial_shape = np.asarray(image.GetSize())
            if image.GetNumberOfComponentsPerPixel() == 1:
                array, channel_dim = array.T, float("nan")
            else:
                array, channel_dim = np.moveaxis(array.T, 0, -1), -1
            affine = sitk_to_ras_affine(image)
            metas.append(
                {
                    "affine": affine,
                    "original_affine": affine.copy(),
                    "spatial_shape": spatial_shape,
                    "space": "RAS",
                    "original_channel_dim": channel_dim,
                    "spacing": np.asarray(image.GetSpacing()),
                    "filename_or_obj": image.GetMetaData(_FOLDER_KEY) if image.HasMetaDataKey(_FOLDER_KEY) else "",
                }
            )
            arrays.append(np.ascontiguousarray(array))
        meta = metas[0]
        if len(arrays) == 1:
            return arrays[0], meta
        for other in metas[1:]:
            if not np.allclose(other["affine"], meta["affine"]) or not np.array_equal(
                other["spatial_shape"], meta["spatial_shape"]
            ):
                raise DicomError(
                    f"DICOM series '{other['filename_or_obj']}' and '{meta['filename_or_obj']}' have different "
                    "grids and cannot be stacked as channels; resample them onto one grid first."
                )
        if isinstance(meta["original_channel_dim"], int):
            return np.concatenate(arrays, axis=meta["original_channel_dim"]), meta
        meta["original_channel_dim"] = 0
        return np.stack(arrays, axis=0), meta
