# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Shared fixtures: small SAM checkpoints in the official key format and the real LiteMedSAM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from samparser_monai.networks.backbones import BACKBONES

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_tiny_checkpoint(path: Path, seed: int) -> Path:
    """Write a random tiny SAM state dict in the official ``segment_anything`` key format."""
    torch.manual_seed(seed)
    model = BACKBONES["tiny"][1]()
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random SAM checkpoint file (official key format)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_sam.pth", seed=1)


@pytest.fixture(scope="session")
def other_tiny_checkpoint(tmp_path_factory) -> Path:
    """A second tiny SAM checkpoint with other weights (a different base)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_sam_other.pth", seed=2)
