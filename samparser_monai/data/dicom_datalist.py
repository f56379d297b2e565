# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""DICOM datalists: series folders paired with their DICOM-SEG objects by SeriesInstanceUID, and a load transform
that rasterises each SEG onto its series' voxel grid."""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping
from pathlib import Path

import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import optional_import

from samparser_monai.data.dicom import load_dicom_seg_label

__all__ = ["LoadDicomSegd", "dicom_datalist"]

pydicom, _ = optional_import("pydicom")
sitk, _ = optional_import("SimpleITK")

logger = logging.getLogger(__name__)


def _header(path: Path) -> pydicom.Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (pydicom.errors.InvalidDicomError, OSError):
        return None


def dicom_datalist(root: str | os.PathLike) -> list[dict]:
    """Items ``{"image": series folder, "label": SEG file, "case": SeriesInstanceUID}`` found below ``root``.

    Every folder holding one DICOM series (read with SimpleITK's GDCM series lookup) is an image; every file whose
    Modality is ``SEG`` (read with pydicom) is a label, paired with the series its ``ReferencedSeriesSequence``
    names. Series without a SEG are left out with a warning; a folder that mixes several series is an error later,
    when it is loaded (:func:`~samparser_monai.data.read_dicom_series` names its series).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no series with a SEG below ``root``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"DICOM folder '{root}' does not exist.")
    series: dict[str, str] = {}
    segs: dict[str, str] = {}
    for folder in sorted({p.parent for p in root.rglob("*") if p.is_file()}):
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ():
            series.setdefault(uid, str(folder))
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            header = _header(path)
            if header is not None and getattr(header, "Modality", "") == "SEG" and "ReferencedSeriesSequence" in header:
                segs[str(header.ReferencedSeriesSequence[0].SeriesInstanceUID)] = str(path)
    items = [{"image": series[uid], "label": segs[uid], "case": uid} for uid in series if uid in segs]
    alone = [uid for uid in series if uid not in segs]
    if alone:
        logger.warning("%d DICOM series have no SEG and are left out: %s", len(alone), ", ".join(alone[:5]))
    if not items:
        raise ValueError(f"No DICOM series with a DICOM-SEG found below '{root}'.")
    return items


class LoadDicomSegd(MapTransform):
    """Load the DICOM-SEG at ``data[label_key]`` as a ``1 x X x Y x Z`` label MetaTensor on the grid of the series
    at ``data[series_key]`` (the same voxels and RAS affine :class:`~samparser_monai.data.DicomSeriesReader` gives).

    Run it before the series itself is loaded (the series key must still hold the folder path).
    """

    def __init__(self, label_key: str = "label", series_key: str = "image") -> None:
        super().__init__([label_key])
        self.label_key, self.series_key = label_key, series_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        seg_file, folder = str(d[self.label_key]), str(d[self.series_key])
        labels, affine = load_dicom_seg_label(seg_file, folder)
        meta = {"filename_or_obj": seg_file, "original_affine": affine, "space": "RAS"}
        d[self.label_key] = MetaTensor(torch.as_tensor(labels[None]), affine=torch.as_tensor(affine), meta=meta)
        return d
