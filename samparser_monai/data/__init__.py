# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Data: datalists (MSD, folders, 2D images, DICOM) and the 2D slice dataset over cached volumes."""

from samparser_monai.data.datalists import (
    case_id,
    folder_datalist,
    image_folder_datalist,
    msd_datalist,
    split_by_case,
)
from samparser_monai.data.dataset_dir import (
    DATASET_FORMATS,
    INFERENCE_SPLITS,
    bundle_datalists,
    dataset_items,
    dataset_label_names,
    inference_datalist,
)
from samparser_monai.data.demo import DEMO_DATASET, make_demo_dataset
from samparser_monai.data.dicom import (
    DicomError,
    DicomSeriesReader,
    load_dicom_seg_label,
    read_dicom_seg,
    read_dicom_series,
    sitk_to_ras_affine,
)
from samparser_monai.data.dicom_datalist import LoadDicomSegd, dicom_datalist
from samparser_monai.data.slice_dataset import SliceDataset

__all__ = [
    "DATASET_FORMATS",
    "INFERENCE_SPLITS",
    "bundle_datalists",
    "dataset_items",
    "dataset_label_names",
    "inference_datalist",
    "DEMO_DATASET",
    "DicomError",
    "DicomSeriesReader",
    "LoadDicomSegd",
    "SliceDataset",
    "case_id",
    "dicom_datalist",
    "folder_datalist",
    "image_folder_datalist",
    "load_dicom_seg_label",
    "make_demo_dataset",
    "msd_datalist",
    "read_dicom_seg",
    "read_dicom_series",
    "sitk_to_ras_affine",
    "split_by_case",
]
