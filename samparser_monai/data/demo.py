# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""A generated demo dataset in the MSD layout, so the bundle runs on a fresh machine with no data and no network.

It is clearly a demo: smooth MR-like volumes with two adjacent ellipsoids (labels 1 and 2, shaped loosely like a
hippocampus head and body), random positions, sizes, contrast, bias field and noise. Nothing medical is learned from
it; it exercises the whole pipeline in minutes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["DEMO_DATASET", "make_demo_dataset"]

#: Value of ``dataset_dir`` that asks the bundle for the generated demo dataset.
DEMO_DATASET = "demo"


def _case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    size = np.asarray(shape, np.float32)
    centre = size * rng.uniform(0.4, 0.6, 3)
    radii = size * rng.uniform([0.12, 0.16, 0.18], [0.18, 0.22, 0.28])
    direction = np.array([0.0, 1.0, 0.3]) / np.linalg.norm([0.0, 1.0, 0.3])
    label = np.zeros(shape, np.uint8)
    for label_id, offset in ((1, -0.45), (2, 0.45)):
        c = centre + offset * radii[1] * direction * 1.6
        r = radii * (1.0 if label_id == 1 else 0.8)
        inside = (((grid - c[:, None, None, None]) / r[:, None, None, None]) ** 2).sum(0) <= 1.0
        label[inside & (label == 0)] = label_id
    bias = 1.0 + 0.3 * np.sin(grid[0] / size[0] * np.pi) * np.cos(grid[1] / size[1] * np.pi)
    tissue = 300.0 + 60.0 * np.sin(grid[0] / 5.0) * np.cos(grid[2] / 7.0)
    contrast = rng.uniform(120.0, 220.0)
    image = bias * (tissue + contrast * (label == 1) + 0.7 * contrast * (label == 2))
    image += rng.normal(0.0, 40.0, shape)
    return image.astype(np.float32), label


def make_demo_dataset(
    root: str | os.PathLike, n_cases: int = 10, shape: tuple[int, int, int] = (48, 56, 32), seed: int = 0
) -> Path:
    """Write (or reuse) a demo dataset in the MSD layout under ``root``; returns ``root``.

    An existing dataset written with the same arguments is reused, so calling this at every bundle start is cheap.
    """
    root = Path(root)
    meta = {"n_cases": n_cases, "shape": list(shape), "seed": seed}
    datalist_file = root / "dataset.json"
    if datalist_file.is_file():
        existing = json.loads(datalist_file.read_text())
        if existing.get("generator") == meta and all((root / d["image"]).is_file() for d in existing["training"]):
            return root
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    affine = np.diag([1.0, 1.0, 1.5, 1.0])
    training = []
    for i in range(n_cases):
        image, label = _case(rng, shape)
        name = f"demo_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / name))
        nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    datalist = {
        "name": "SAM-PARSER demo (generated, not medical data)",
        "description": "Generated MR-like volumes with two adjacent ellipsoids; for demos and tests only.",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "head", "2": "body"},
        "numTraining": n_cases,
        "numTest": 0,
        "training": training,
        "test": [],
        "generator": meta,
    }
    datalist_file.write_text(json.dumps(datalist, indent=4))
    return root
