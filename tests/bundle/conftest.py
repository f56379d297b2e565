# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Fixtures for bundle tests: config paths and a small generated MSD-layout dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

from samparser_monai.data import make_demo_dataset

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "bundle" / "configs"
SCHEMA = ROOT.parent / "shared" / "schemas" / "meta_schema_20240725.json"


def tiny_overrides(tmp_path: Path, dataset_dir: Path, **extra) -> dict:
    """Overrides that make the bundle run in seconds: tiny random SAM, few samples, small validation batches."""
    return {
        "bundle_root": str(tmp_path / "bundle"),
        "dataset_dir": str(dataset_dir),
        "backbone": "tiny",
        "epochs": 1,
        "samples_per_epoch": 4,
        "batch_size": 2,
        "val_fraction": 0.34,
        "use_tensorboard": False,
        **extra,
    }


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """Three generated cases in the MSD layout (two train, one validation)."""
    return make_demo_dataset(tmp_path_factory.mktemp("msd") / "Task00_Demo", n_cases=3, shape=(32, 36, 10), seed=1)
