# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""The datalists a bundle run reads from ``dataset_dir``: by dataset format, split by case, or every case."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from samparser_monai.data.datalists import folder_datalist, image_folder_datalist, msd_datalist, split_by_case
from samparser_monai.data.demo import DEMO_DATASET, make_demo_dataset
from samparser_monai.data.dicom_datalist import dicom_datalist

__all__ = [
    "DATASET_FORMATS",
    "INFERENCE_SPLITS",
    "bundle_datalists",
    "dataset_items",
    "dataset_label_names",
    "inference_datalist",
]

logger = logging.getLogger(__name__)

#: ``dataset_format`` values of the bundle and the datalist each one reads from ``dataset_dir``.
DATASET_FORMATS = ("msd", "folders", "images_2d", "dicom")


def bundle_datalists(
    dataset_dir: str | os.PathLike,
    dataset_format: str = "msd",
    val_fraction: float = 0.2,
    seed: int = 0,
    demo_dir: str | os.PathLike | None = None,
) -> tuple[list[dict], list[dict]]:
    """Training and validation items of ``dataset_dir``, split by case.

    Args:
        dataset_dir: the data folder, or ``"demo"`` for the generated demo dataset (written once to ``demo_dir``).
        dataset_format: ``"msd"`` (dataset.json, imagesTr/, labelsTr/), ``"folders"`` (images/ and labels/ with the
            same file names), ``"images_2d"`` (images/ and masks/, PNG/JPG) or ``"dicom"`` (series folders and their
            DICOM-SEG objects anywhere below ``dataset_dir``).
        val_fraction: share of cases for validation.
        seed: seed of the split.
        demo_dir: where the demo dataset goes.

    Raises:
        ValueError: unknown format, or a split that leaves the training or validation side empty.
        FileNotFoundError: ``dataset_dir`` does not exist (one sentence naming it).
    """
    items = dataset_items(dataset_dir, dataset_format, demo_dir)
    train, val = split_by_case(items, val_fraction=val_fraction, seed=seed)
    if not train or not val:
        raise ValueError(
            f"{len(items)} items in '{dataset_dir}' give {len(train)} training and {len(val)} validation items: "
            "a run needs at least two cases."
        )
    return train, val


#: ``inference_split`` values of the bundle's inference config
INFERENCE_SPLITS = ("all", "training", "validation")


def inference_datalist(
    dataset_dir: str | os.PathLike,
    dataset_format: str = "msd",
    split: str = "all",
    val_fraction: float = 0.2,
    seed: int = 0,
    demo_dir: str | os.PathLike | None = None,
) -> list[dict]:
    """The items a batch inference run segments: every case of ``dataset_dir`` (``split="all"``), or one side of
    the training split (``"training"``, ``"validation"``: the same cases as :func:`bundle_datalists` gives).

    Raises:
        ValueError: unknown split or format.
    """
    if split not in INFERENCE_SPLITS:
        raise ValueError(f"Unknown inference_split {split!r}; use one of {list(INFERENCE_SPLITS)}.")
    if split == "all":
        return dataset_items(dataset_dir, dataset_format, demo_dir)
    train, val = bundle_datalists(dataset_dir, dataset_format, val_fraction, seed, demo_dir)
    return train if split == "training" else val


def dataset_items(
    dataset_dir: str | os.PathLike, dataset_format: str = "msd", demo_dir: str | os.PathLike | None = None
) -> list[dict]:
    """Every item of ``dataset_dir`` in ``dataset_format`` (see :func:`bundle_datalists`), unsplit.

    Raises:
        ValueError: unknown format.
        FileNotFoundError: ``dataset_dir`` does not exist (one sentence naming it).
    """
    if dataset_format not in DATASET_FORMATS:
        raise ValueError(f"Unknown dataset_format {dataset_format!r}; use one of {list(DATASET_FORMATS)}.")
    if str(dataset_dir) == DEMO_DATASET:
        root = make_demo_dataset(demo_dir or "demo_data")
        logger.info("Using the generated demo dataset in %s (not medical data).", root)
        items = msd_datalist(root)
    else:
        root = Path(dataset_dir)
        if not root.is_dir():
            raise FileNotFoundError(
                f"dataset_dir '{root}' does not exist: pass --dataset_dir <folder> (or 'demo' for generated data)."
            )
        if dataset_format == "msd":
            items = msd_datalist(root)
        elif dataset_format == "folders":
            items = folder_datalist(str(root / "images" / "*"), str(root / "labels" / "*"))
        elif dataset_format == "images_2d":
            items = image_folder_datalist(root / "images", root / "masks")
        else:
            items = dicom_datalist(root)
    return items


def dataset_label_names(dataset_dir: str | os.PathLike, demo_dir: str | os.PathLike | None = None) -> dict[int, str]:
    """Label id -> name from the ``dataset.json`` of an MSD-layout ``dataset_dir`` (or the demo); empty otherwise."""
    root = Path(demo_dir or "demo_data") if str(dataset_dir) == DEMO_DATASET else Path(dataset_dir)
    path = root / "dataset.json"
    if not path.is_file():
        return {}
    labels = json.loads(path.read_text()).get("labels", {})
    return {int(k): str(v) for k, v in labels.items() if str(k).isdigit() and int(k) != 0}
