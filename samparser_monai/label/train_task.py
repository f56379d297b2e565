# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""MONAI Label train task: the "Train" button runs the bundle's recipe on the studies with final labels, continuing
from the checkpoint being served, and publishes the best new coefficient checkpoint for the infer task."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from samparser_monai.label._monailabel import Datastore, TrainTask
from samparser_monai.label.config import LabelConfig
from samparser_monai.label.training import TRAIN_OPTIONS, fine_tune, publish_checkpoint, train_options

__all__ = ["SamParserTrainTask"]

logger = logging.getLogger(__name__)


class SamParserTrainTask(TrainTask):
    """Fine-tunes SAM-PARSER coefficients and decoder on the app's labelled studies.

    Args:
        config: the app's settings.
        work_dir: the task's folder: ``model.pt`` (the published checkpoint), ``train_stats.json`` and ``run/``.
        locate: returns the checkpoint served now (training continues from it), or None for the stock model.
    """

    def __init__(self, config: LabelConfig, work_dir: str | Path, locate: Callable[[], Path | None]) -> None:
        super().__init__(f"SAM-PARSER {config.backbone}: fine-tune with the bundle's train.json ({config.preset})")
        self.settings, self.work_dir, self.locate = config, Path(work_dir), locate

    @property
    def published(self) -> Path:
        """Where a finished run puts its best coefficient checkpoint."""
        return self.work_dir / "model.pt"

    def config(self) -> dict[str, Any]:
        """Options a client may set per run (bundle ids and their defaults)."""
        return dict(TRAIN_OPTIONS)

    def stats(self) -> dict[str, Any]:
        """Statistics of the last finished run (empty before the first)."""
        path = self.work_dir / "train_stats.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        """Train on the studies with a final label and publish the best checkpoint; returns the run's statistics.

        Raises:
            ValueError: bad options or too few labelled studies (one sentence; the task log shows it).
            FileNotFoundError: the bundle or the method preset was not found.
        """
        options = train_options(request)
        items = datastore.datalist()
        start_from = self.locate()
        logger.info("training on %d labelled studies, from %s", len(items), start_from or "the stock model")
        stats = fine_tune(items, self.settings, self.work_dir / "run", options, start_from)
        stats["published"] = str(publish_checkpoint(stats["checkpoint"], self.published))
        stats["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        (self.work_dir / "train_stats.json").write_text(json.dumps(stats, indent=2))
        logger.info("published %s: %s", stats["published"], stats)
        return stats
