# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""The geometry of an image as stored, read from its header: shape, affine, spacing, and which stored axis the
network slices along once the volume is oriented to RAS."""

from __future__ import annotations

import os
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from samparser_monai.data.dicom import sitk_to_ras_affine

__all__ = ["ImageGeometry", "read_geometry"]


@dataclass(frozen=True)
class ImageGeometry:
    """Shape and voxel-to-RAS affine of an image as stored (the IJK a viewer shows).

    Attributes:
        shape: voxels along I, J, K.
        affine: 4 x 4 voxel-to-RAS-millimetre matrix.
    """

    shape: tuple[int, ...]
    affine: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along I, J, K in millimetres."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    def stored_axis(self, oriented_axis: int) -> int:
        """The stored axis (0: I, 1: J, 2: K) that becomes ``oriented_axis`` of the RAS-oriented volume."""
        ornt = nib.orientations.io_orientation(self.affine)
        return int(np.flatnonzero(ornt[:, 0] == oriented_axis)[0])


def read_geometry(path: str | os.PathLike) -> ImageGeometry:
    """The geometry of a NIfTI file (nibabel) or any file SimpleITK reads (NRRD, MHA ...), from the header only.

    Raises:
        ValueError: the file cannot be read as an image (one sentence naming it).
    """
    path = os.fspath(path)
    try:
        if path.lower().endswith((".nii", ".nii.gz")):
            header = nib.load(path)
            return ImageGeometry(tuple(int(s) for s in header.shape[:3]), np.asarray(header.affine, np.float64))
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        reader.ReadImageInformation()
    except Exception as err:  # nibabel and SimpleITK raise many types for unreadable files
        raise ValueError(
            f"Image '{path}' could not be read ({type(err).__name__}); is it a NIfTI or NRRD volume?"
        ) from err
    # an ImageFileReader answers the same geometry calls as the image it would read
    return ImageGeometry(tuple(int(n) for n in reader.GetSize()), sitk_to_ras_affine(reader))
