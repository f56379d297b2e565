# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Datalists: MSD ``dataset.json``, image/label folder pairs, 2D image/mask folders, and a split by case.

Every item is a dict ``{"image": path, "label": path, "case": case id}`` as MONAI transforms expect; ``case`` names
the patient/volume so that splits never put slices of one case on both sides.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

from monai.data import load_decathlon_datalist

__all__ = ["case_id", "folder_datalist", "image_folder_datalist", "msd_datalist", "split_by_case"]

logger = logging.getLogger(__name__)

_MULTI_SUFFIXES = (".nii.gz", ".nrrd.gz", ".mha.gz")
IMAGE_2D_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def case_id(path: str | os.PathLike) -> str:
    """The case id of a file: its name without extensions (``hippocampus_001.nii.gz`` -> ``hippocampus_001``)."""
    name = Path(path).name
    for suffix in _MULTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem if Path(name).suffix else name


def msd_datalist(dataset_dir: str | os.PathLike, section: str = "training") -> list[dict]:
    """Items of an MSD task folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``), via MONAI's decathlon loader.

    Raises:
        FileNotFoundError: ``dataset_dir`` or its ``dataset.json`` does not exist.
        ValueError: the section is missing or empty.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset_dir '{root}' does not exist; point it at an MSD task folder with dataset.json."
        )
    datalist_file = root / "dataset.json"
    if not datalist_file.is_file():
        raise FileNotFoundError(
            f"dataset_dir '{root}' has no dataset.json; point it at an MSD task folder (dataset.json, imagesTr/, "
            "labelsTr/) or use a folder datalist."
        )
    try:
        items = load_decathlon_datalist(datalist_file, is_segmentation=True, data_list_key=section, base_dir=root)
    except ValueError as err:
        raise ValueError(f"{datalist_file} has no '{section}' section.") from err
    if not items:
        raise ValueError(f"The '{section}' section of {datalist_file} is empty.")
    return [{**item, "case": case_id(item["image"])} for item in items]


def folder_datalist(images: str, labels: str, label_suffix: str = "") -> list[dict]:
    """Pair images and label maps found by two glob patterns, by case id.

    Args:
        images: glob of image files, e.g. ``"data/images/*.nii.gz"``.
        labels: glob of label files, e.g. ``"data/labels/*.nii.gz"``.
        label_suffix: a suffix the label names add to the image case id (``"_seg"`` for ``case_seg.nii.gz``).

    Unpaired files are reported in one warning; no pair at all is an error.
    """
    image_files = {case_id(p): p for p in sorted(glob.glob(images))}
    label_files = {}
    for p in sorted(glob.glob(labels)):
        cid = case_id(p)
        label_files[cid[: -len(label_suffix)] if label_suffix and cid.endswith(label_suffix) else cid] = p
    items = [{"image": image_files[c], "label": label_files[c], "case": c} for c in image_files if c in label_files]
    unpaired = sorted(set(image_files) ^ set(label_files))
    if unpaired:
        logger.warning("%d files have no partner and are left out: %s", len(unpaired), ", ".join(unpaired[:10]))
    if not items:
        raise ValueError(
            f"No image/label pairs: {len(image_files)} files match {images!r}, {len(label_files)} {labels!r}."
        )
    return items


def image_folder_datalist(images_dir: str | os.PathLike, masks_dir: str | os.PathLike) -> list[dict]:
    """Pair 2D images with their masks (PNG/JPG/...) by file name.

    A mask belongs to the image whose name is the mask's name or its longest prefix, so both ``images/a.jpg`` +
    ``masks/a.png`` and several masks per image (``masks/a_liver_000.png``, ``masks/a_aorta_000.png``, as in
    SAM-Med2D) work. Each mask gives one item; ``case`` is the image's name.
    """
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"Folder '{folder}' does not exist.")
    images = {case_id(p): p for p in sorted(images_dir.iterdir()) if p.suffix.lower() in IMAGE_2D_EXTENSIONS}
    by_length = sorted(images, key=len, reverse=True)
    items, orphans = [], []
    for mask in sorted(masks_dir.iterdir()):
        if mask.suffix.lower() not in IMAGE_2D_EXTENSIONS:
            continue
        name = case_id(mask)
        owner = name if name in images else next((c for c in by_length if name.startswith(c + "_")), None)
        if owner is None:
            orphans.append(mask.name)
            continue
        items.append({"image": str(images[owner]), "label": str(mask), "case": owner, "name": name})
    if orphans:
        logger.warning("%d masks have no image and are left out: %s", len(orphans), ", ".join(orphans[:10]))
    if not items:
        raise ValueError(f"No image/mask pairs in '{images_dir}' and '{masks_dir}'.")
    return items


def split_by_case(
    datalist: Sequence[dict], val_fraction: float = 0.2, seed: int = 0, key: str = "case"
) -> tuple[list[dict], list[dict]]:
    """Deterministic train/validation split by case id, never by item or slice.

    Cases are ordered by a hash of ``(seed, case id)``, independent of the datalist's order and of the machine; the
    first ``round(n_cases * val_fraction)`` (at least one when there are two cases or more) go to validation.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    cases = sorted({str(item.get(key, case_id(item["image"]))) for item in datalist})
    order = sorted(cases, key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())
    n_val = math.floor(len(cases) * val_fraction + 0.5)
    n_val = max(n_val, 1) if val_fraction > 0 and len(cases) > 1 else n_val
    val_cases = set(order[:n_val])
    train = [d for d in datalist if str(d.get(key, case_id(d["image"]))) not in val_cases]
    val = [d for d in datalist if str(d.get(key, case_id(d["image"]))) in val_cases]
    return train, val
