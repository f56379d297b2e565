# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""The MONAI Label app: one infer task and one train task on the same served model, nothing else registered
(no MONAI Label sample model such as SAM2, so nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from samparser_monai import __version__
from samparser_monai.label._monailabel import HTTPException, MONAILabelApp
from samparser_monai.label.config import LabelConfig
from samparser_monai.label.http_errors import install_request_error_handlers
from samparser_monai.label.infer import SamParserInferTask
from samparser_monai.label.model import LiveModel
from samparser_monai.label.train_task import SamParserTrainTask
from samparser_monai.process import retain_freed_host_memory

__all__ = ["MODEL_NAME", "SamParserLabelApp"]

#: Name of the model (infer and train task) on the server: ``POST /infer/samparser``, ``POST /train/samparser``.
MODEL_NAME = "samparser"


class SamParserLabelApp(MONAILabelApp):
    """SAM-PARSER served to MONAI Label clients (3D Slicer, OHIF).

    Trained checkpoints go to ``<app_dir>/model/samparser/model.pt``; the infer task serves that file when it
    exists (reloading it when a training run replaces it), else ``--conf coefficients``, else the stock base model.

    Args:
        app_dir: the app folder (MONAI Label keeps ``model/``, ``logs/`` there).
        studies: the studies folder (images; labels in ``labels/final/``).
        conf: ``--conf`` settings, see :data:`~samparser_monai.label.config.CONF_KEYS`.
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, Any]) -> None:
        self.settings = LabelConfig.from_conf(conf or {})
        retain_freed_host_memory(self.settings.retain_host_memory)
        self.work_dir = Path(app_dir) / "model" / MODEL_NAME
        self.model = LiveModel(self.settings, self.serving_checkpoint)
        install_request_error_handlers()
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SAM-PARSER",
            description="Segment Anything fine-tuned through the SVD coefficients of its image encoder (SAM-PARSER)",
            version=__version__,
            labels=list(self.settings.labels),
        )

    def serving_checkpoint(self) -> Path | None:
        """The coefficient checkpoint to serve: the last published by training, else ``--conf coefficients``."""
        published = self.work_dir / "model.pt"
        if published.is_file():
            return published
        return Path(self.settings.coefficients) if self.settings.coefficients else None

    def init_infers(self) -> dict[str, SamParserInferTask]:
        """The single infer task."""
        return {MODEL_NAME: SamParserInferTask(self.model, self.settings)}

    def init_trainers(self) -> dict[str, SamParserTrainTask]:
        """The single train task, on the same model name."""
        return {MODEL_NAME: SamParserTrainTask(self.settings, self.work_dir, self.serving_checkpoint)}

    def init_scoring_methods(self) -> dict[str, Any]:
        """No scoring methods."""
        return {}

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        """MONAI Label's inference, after refusing an image id the datastore does not hold (HTTP 404)."""
        image = request.get("image")
        store = datastore or self.datastore()
        if isinstance(image, str) and not os.path.exists(image) and not store.get_image_uri(image):
            raise HTTPException(
                status_code=404, detail=f"Image {image!r} is not in the studies; pick one of GET /datastore/."
            )
        return super().infer(request, datastore)
