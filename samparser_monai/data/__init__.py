# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Data: datalists (MSD, folders, 2D images, DICOM) and the 2D slice dataset over cached volumes."""

from samparser_monai.data.datalists import (
    case_id,
    folder_datalist,
    image_folder_datalist,
    msd_datalist,
    split_by_case,
)
from samparser_monai.data.slice_dataset import SliceDataset

__all__ = [
    "SliceDataset",
    "case_id",
    "folder_datalist",
    "image_folder_datalist",
    "msd_datalist",
    "split_by_case",
]
