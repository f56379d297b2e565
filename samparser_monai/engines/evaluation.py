# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Per-case, per-label evaluation (Dice, surface Dice, HD95 in mm) written to one CSV with the prompt settings."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

__all__ = ["CaseMetricsWriter", "case_metrics"]

logger = logging.getLogger(__name__)


def case_metrics(
    pred: torch.Tensor, label: torch.Tensor, spacing: Sequence[float] | None = None, tolerance_mm: float = 1.0
) -> list[dict[str, float]]:
    """Dice, surface Dice (at ``tolerance_mm``) and HD95 (mm) of each foreground channel of one case.

    Args:
        pred: one-hot ``C x X x Y x Z`` prediction (channel 0 = background).
        label: one-hot reference of the same shape.
        spacing: voxel size in mm (default 1).
        tolerance_mm: surface Dice tolerance.

    Returns:
        One dict per foreground channel; NaN where the reference does not hold the label.
    """
    y_pred, y = pred[None].float(), label[None].float()
    n = y.shape[1] - 1
    spacing = [float(s) for s in spacing] if spacing is not None else None
    dice = compute_dice(y_pred, y, include_background=False, ignore_empty=True)[0]
    surface = compute_surface_dice(y_pred, y, class_thresholds=[tolerance_mm] * n, spacing=spacing)[0]
    hd95 = compute_hausdorff_distance(y_pred, y, include_background=False, percentile=95, spacing=spacing)[0]
    rows = []
    for c in range(n):
        present = bool(y[0, c + 1].any())
        rows.append(
            {
                "dice": float(dice[c]) if present else math.nan,
                "surface_dice": float(surface[c]) if present else math.nan,
                "hd95": float(hd95[c]) if present else math.nan,
            }
        )
    return rows


class CaseMetricsWriter:
    """An evaluator handler that scores every case and writes ``<output_dir>/metrics.csv``.

    Each row is one case and one label: Dice, surface Dice and HD95 (mm, from the label's voxel spacing), plus the
    prompt settings (box jitter, mode, seed) and the checkpoint, so the numbers always travel with how they were
    made. A ``metrics_summary.csv`` holds the mean per label, and ``settings.json`` the settings.

    Args:
        output_dir: where the CSV files go.
        label_names: label id -> name (e.g. the MSD ``dataset.json`` labels); ids default to their number.
        tolerance_mm: surface Dice tolerance.
        settings: extra columns, e.g. ``{"box_jitter": 0.1, "jitter_mode": "fraction", "seed": 0}``.
    """

    def __init__(
        self,
        output_dir: str,
        label_names: Mapping[int | str, str] | None = None,
        tolerance_mm: float = 1.0,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.output_dir, self.tolerance_mm = output_dir, tolerance_mm
        self.label_names = {int(k): str(v) for k, v in (label_names or {}).items()}
        self.settings = dict(settings or {})
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        """Score at every iteration, write at completion."""
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.score)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def score(self, engine: Engine) -> None:
        """Score the cases of the last batch (``engine.state.output``: decollated one-hot ``pred`` / ``label``)."""
        for item in engine.state.output:
            pred, label = item["pred"], item["label"]
            spacing = label.pixdim.tolist() if isinstance(label, MetaTensor) else None
            source = label.meta.get("filename_or_obj", "") if isinstance(label, MetaTensor) else ""
            case = os.path.basename(str(source)).split(".")[0] or f"case_{len(self.rows)}"
            for c, values in enumerate(case_metrics(pred, label, spacing, self.tolerance_mm), start=1):
                row = {"case": case, "label": c, "label_name": self.label_names.get(c, str(c)), **values}
                self.rows.append({**row, **self.settings})

    def write(self, engine: Engine) -> None:
        """Write ``metrics.csv``, ``metrics_summary.csv`` and ``settings.json``; log the summary."""
        os.makedirs(self.output_dir, exist_ok=True)
        path = os.path.join(self.output_dir, "metrics.csv")
        if not self.rows:
            logger.warning("No case was evaluated; %s not written.", path)
            return
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)
        summary = []
        for c in sorted({row["label"] for row in self.rows}):
            rows = [row for row in self.rows if row["label"] == c]
            means = {}
            for key in ("dice", "surface_dice", "hd95"):
                values = [row[key] for row in rows if not math.isnan(row[key]) and not math.isinf(row[key])]
                means[key] = sum(values) / len(values) if values else math.nan
            summary.append({"label": c, "label_name": rows[0]["label_name"], "cases": len(rows), **means})
        with open(os.path.join(self.output_dir, "metrics_summary.csv"), "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(summary[0]))
            writer.writeheader()
            writer.writerows(summary)
        with open(os.path.join(self.output_dir, "settings.json"), "w") as handle:
            json.dump({**self.settings, "tolerance_mm": self.tolerance_mm}, handle, indent=4)
        for row in summary:
            logger.info(
                "label %s (%s): Dice %.4f, surface Dice %.4f, HD95 %.2f mm over %d cases",
                row["label"],
                row["label_name"],
                row["dice"],
                row["surface_dice"],
                row["hd95"],
                row["cases"],
            )
        print(f"per-case metrics: {os.path.abspath(path)}", flush=True)
