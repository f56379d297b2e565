# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Ready-made transform chains, so a bundle config declares a dataset in a few lines."""

from __future__ import annotations

from collections.abc import Sequence

from monai.data import ImageReader
from monai.transforms import Compose, EnsureTyped, LoadImaged, Orientationd, ScaleIntensityRanged

from samparser_monai.transforms.box_prompts import BoxPromptd, UserBoxPromptd
from samparser_monai.transforms.checks import CheckVolumePaird, ReplaceNonFinited
from samparser_monai.transforms.click_prompts import ClickPromptd
from samparser_monai.transforms.intensity import IntensityPresetd
from samparser_monai.transforms.mask_prompts import MaskPromptd
from samparser_monai.transforms.spatial import ResizeLongestPadd

__all__ = ["BOX_PROTOCOLS", "image_2d_transforms", "slice_transforms", "volume_transforms"]


def volume_transforms(
    intensity: str = "mr",
    axcodes: str = "RAS",
    reader: ImageReader | str | None = None,
    keys: Sequence[str] = ("image", "label"),
    label_format: str = "image",
) -> Compose:
    """Load, check, orient and normalise a 3D image/label pair: the cached, deterministic part of training.

    Args:
        intensity: an :data:`~samparser_monai.transforms.INTENSITY_PRESETS` name (``"mr"``, ``"ct_abdomen"``, ...).
        axcodes: orientation of the volumes (``"RAS"``: axis 2 runs inferior to superior, axial slices).
        reader: a MONAI image reader (e.g. :class:`~samparser_monai.data.DicomSeriesReader`), default by suffix.
        keys: image key first, then the label key (omit it for images without labels).
        label_format: ``"image"`` (a label map file MONAI can read) or ``"dicom_seg"`` (a DICOM-SEG object drawn on
            the image's DICOM series, see :func:`~samparser_monai.data.dicom_datalist`).
    """
    keys = list(keys)
    if label_format not in ("image", "dicom_seg"):
        raise ValueError(f"label_format must be 'image' or 'dicom_seg', got {label_format!r}.")
    if label_format == "dicom_seg":
        from samparser_monai.data.dicom_datalist import LoadDicomSegd

        loading = [
            LoadDicomSegd(keys[1], keys[0]),
            LoadImaged(keys=keys[0], reader=reader, ensure_channel_first=True, image_only=True),
        ]
    else:
        loading = [LoadImaged(keys=keys, reader=reader, ensure_channel_first=True, image_only=True)]
    return Compose(
        [
            *loading,
            ReplaceNonFinited(keys=keys[0]),
            CheckVolumePaird(keys[0], keys[1] if len(keys) > 1 else "label", allow_missing_keys=len(keys) == 1),
            Orientationd(keys=keys, axcodes=axcodes, labels=None),
            IntensityPresetd(keys=keys[0], preset=intensity),
            EnsureTyped(keys=keys, track_meta=True),
        ]
    )


def slice_transforms(
    spatial_size: int,
    jitter: float = 0.1,
    jitter_mode: str = "fraction",
    empty_box: str = "random",
    track_meta: bool = True,
    box_protocol: str = "tight",
    click_fraction: float = 0.0,
    mask_fraction: float = 0.0,
    mask_shift: int = 0,
) -> Compose:
    """Box prompt from the 2D target (with jitter) and SAM's resize-longest-side + pad to ``spatial_size``.

    ``box_protocol="user"`` then swaps the box, at random, for one like users' prompts give at inference
    (:class:`~samparser_monai.transforms.UserBoxPromptd`: tight, a neighbouring slice's, an ROI projection, a third
    each); ``"neighbour"``: half tight, half a neighbouring slice's (what propagation gives, without the loose ROI
    projections). Both need a :class:`~samparser_monai.data.SliceDataset` with ``context=True``.

    ``click_fraction`` > 0 prompts that share of the samples with clicks (alone, or with the box), after the resize
    (:class:`~samparser_monai.transforms.ClickPromptd`); every sample then carries ``points`` and ``point_labels``
    for :meth:`~samparser_monai.networks.SamParser.forward`.

    ``mask_fraction`` > 0 prompts that share of the samples as propagation prompts a slice: a neighbouring slice's
    mask with its box shrunk a pixel a side (:class:`~samparser_monai.transforms.MaskPromptd`); every sample then
    carries ``mask_prompt``. Needs ``context=True`` too. ``mask_shift`` > 0 also moves each mask prompt by up to that
    many pixels along each in-plane axis (``MaskPromptd``'s ``shift``).

    ``track_meta=False`` (training) ends with plain tensors: no metadata to collate, and the loss and metrics then
    run without MetaTensor's per-operation bookkeeping; keep the default where the resize must be inverted.
    """
    return Compose(
        [
            BoxPromptd(keys="label", jitter=jitter, jitter_mode=jitter_mode, per="mask", empty_box=empty_box),
            *_user_boxes(box_protocol, keep_context=mask_fraction > 0),
            *([MaskPromptd(keys="label", probability=mask_fraction, shift=mask_shift)] if mask_fraction > 0 else []),
            ResizeLongestPadd(
                keys=["image", "label"] + (["mask_prompt"] if mask_fraction > 0 else []),
                spatial_size=spatial_size,
                mode=["bilinear", "nearest-exact"] + (["nearest-exact"] if mask_fraction > 0 else []),
            ),
            *([ClickPromptd(keys="label", probability=click_fraction)] if click_fraction > 0 else []),
            *([] if track_meta else [EnsureTyped(keys=["image", "label"], track_meta=False)]),
        ]
    )


#: ``box_protocol`` values of :func:`slice_transforms` (the bundle's ``train_box_protocol``)
BOX_PROTOCOLS = ("tight", "user", "neighbour")


def _user_boxes(name: str, keep_context: bool = False) -> list[UserBoxPromptd]:
    """The box-swapping transform of a ``box_protocol`` (none for ``"tight"``); ``keep_context``: see
    :class:`~samparser_monai.transforms.UserBoxPromptd`."""
    if name not in BOX_PROTOCOLS:
        raise ValueError(f"Unknown box protocol {name!r}; use one of {list(BOX_PROTOCOLS)}.")
    if name == "tight":
        return []
    weights = {"tight": 1.0, "neighbour": 1.0} if name == "neighbour" else None
    return [UserBoxPromptd(probabilities=weights, keep_context=keep_context)]


def image_2d_transforms(
    spatial_size: int,
    jitter: float = 0.1,
    jitter_mode: str = "fraction",
    intensity: str = "uint8",
    track_meta: bool = True,
    click_fraction: float = 0.0,
    mask_fraction: float = 0.0,
) -> Compose:
    """2D photographs or slices with binary masks (PNG/JPG, mask values 0/255): load, scale, binarise, prompt, resize.

    Args:
        spatial_size: the backbone's input side.
        jitter: box jitter, ``jitter_mode``: see :class:`~samparser_monai.transforms.BoxPromptd`.
        intensity: ``"uint8"`` divides 8-bit images by 255; any intensity preset name applies that preset.
        track_meta: ``False`` (training) ends with plain tensors, see :func:`slice_transforms`.
        click_fraction: share of samples prompted with clicks, see :func:`slice_transforms`.
        mask_fraction: must be 0: mask prompts come from neighbouring slices, which 2D images do not have.

    Raises:
        ValueError: ``mask_fraction`` > 0.
    """
    if mask_fraction > 0:
        raise ValueError(
            f"train_mask_prompt_fraction {mask_fraction} needs the neighbouring slices of 3D volumes, and 2D images "
            "have none: leave it 0 with the images_2d preset."
        )
    scale = (
        ScaleIntensityRanged(keys="image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True)
        if intensity == "uint8"
        else IntensityPresetd(keys="image", preset=intensity)
    )
    return Compose(
        [
            LoadImaged(keys=["image", "label"], ensure_channel_first=True, image_only=True),
            CheckVolumePaird(spatial_dims=2, allow_missing_keys=True, check_channels=False),
            scale,
            _Binarised(),
            slice_transforms(
                spatial_size,
                jitter,
                jitter_mode,
                empty_box="none",
                track_meta=track_meta,
                click_fraction=click_fraction,
            ),
        ]
    )


class _Binarised:
    """``label > 0`` as float32 (2D masks are stored 0/255; an RGB mask counts any channel)."""

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        label = d["label"]
        d["label"] = (label > 0).any(dim=0, keepdim=True).float()
        return d
