# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""What a batch user reads about the prompt engine's work on each case (``summary.csv``)."""

from __future__ import annotations

import torch

from samparser_monai.engines.prompt_engine import ObjectPrompt, PromptResult
from samparser_monai.engines.volume_inference import propagation_report


def engine_result() -> PromptResult:
    """Three objects: label 1 kept on 3 slices, label 2 found nothing, label 3 kept but lost its voxels."""
    labels = torch.zeros(8, 8, 6, dtype=torch.int64)
    labels[2:5, 2:5, 1:4] = 1
    return PromptResult(labels, slices=[[1, 2, 3], [], [2]], stops=[["area", "roi"], ["empty"], ["overlap", "met"]])


def test_propagation_report_names_each_objects_slices_and_stops_and_warns_of_an_empty_label():
    objects = [ObjectPrompt(1, 2, torch.tensor([2, 2, 5, 5])), ObjectPrompt(2, 3, torch.tensor([1, 1, 3, 3])),
               ObjectPrompt(3, 2, torch.tensor([2, 2, 5, 5]))]  # fmt: skip
    text, warnings = propagation_report(objects, engine_result())
    assert text == "label 1: 3 slices (area, roi); label 2: 0 slices (empty); label 3: 1 slice (overlap, met)"
    assert warnings == [
        "label 2 is empty in the result: the model found nothing at its prompt (stops: empty)",
        "label 3 is empty in the result: every voxel went to another label (stops: overlap, met)",
    ]
