# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Per-case metrics: exact on known shapes, in mm, NaN for labels the reference lacks."""

from __future__ import annotations

import math

import torch

from samparser_monai.engines import case_metrics


def _one_hot(label: torch.Tensor, n: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(label, n).permute(3, 0, 1, 2)


def test_case_metrics_known_values():
    label = torch.zeros(20, 20, 10, dtype=torch.long)
    label[5:10, 5:10, 2:6] = 1
    perfect = case_metrics(_one_hot(label), _one_hot(label), spacing=(1.0, 1.0, 2.0))
    assert perfect[0] == {"dice": 1.0, "surface_dice": 1.0, "hd95": 0.0}
    assert all(math.isnan(v) for v in perfect[1].values()), "label 2 is absent from the reference"
    shifted = torch.zeros_like(label)
    shifted[5:10, 5:10, 3:7] = 1  # one slice off along z (2 mm)
    rows = case_metrics(_one_hot(shifted), _one_hot(label), spacing=(1.0, 1.0, 2.0), tolerance_mm=1.0)
    assert abs(rows[0]["dice"] - 0.75) < 1e-6
    assert abs(rows[0]["hd95"] - 2.0) < 1e-6, "HD95 is in mm: one 2 mm slice"
    assert rows[0]["surface_dice"] < 1.0
    assert (
        case_metrics(_one_hot(shifted), _one_hot(label), spacing=(1.0, 1.0, 2.0), tolerance_mm=2.0)[0]["surface_dice"]
        == 1.0
    )
