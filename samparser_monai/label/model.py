# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""The network the app serves: the base SAM plus the newest coefficient checkpoint, rebuilt when that file changes
(a finished training run publishes a new one), merged for stock inference speed."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from samparser_monai.export import read_coefficient_checkpoint
from samparser_monai.label.config import LabelConfig
from samparser_monai.networks import SamParser, load_coefficient_state

__all__ = ["LiveModel", "build_model"]

logger = logging.getLogger(__name__)


def build_model(config: LabelConfig, checkpoint: str | os.PathLike | None = None) -> SamParser:
    """The merged, eval-mode network: the stock base model, or the base with a coefficient checkpoint loaded.

    The checkpoint says which coefficients and which trainable policy it was saved with; the method preset only adds
    its ``network_def#...`` options (e.g. the LoRA rank).

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ValueError: the checkpoint is unreadable or belongs to another base model (one sentence).
    """
    kwargs: dict[str, Any] = {"coefficients": None, "trainable": "decoder"}  # zero-shot: the stock model, no SVD
    state = None
    if checkpoint is not None:
        state = read_coefficient_checkpoint(checkpoint)
        kwargs = {**config.preset_network_kwargs(), "coefficients": state["coefficients"]}
        kwargs["trainable"] = state.get("trainable", "parser")
    for key in ("form", "cache_trunk", "checkpoint_blocks"):  # training-only options
        kwargs.pop(key, None)
    model = SamParser(config.backbone, config.base_checkpoint, **kwargs)
    if state is not None:
        load_coefficient_state(model, state)
    return model.merge().eval().to(config.device)


class LiveModel:
    """Serves :func:`build_model` of the checkpoint ``locate()`` names, rebuilt when its path or mtime changes.

    Args:
        config: the app's settings.
        locate: returns the coefficient checkpoint to serve now (the newest published one), or None.
    """

    def __init__(self, config: LabelConfig, locate: Callable[[], Path | None]) -> None:
        self.config, self.locate = config, locate
        self._lock = threading.Lock()
        self._key: tuple[str | None, float] | None = None
        self._model: SamParser | None = None

    def current(self) -> tuple[SamParser, str | None]:
        """The network to use now and the checkpoint it holds (None: the stock base model)."""
        path = self.locate()
        key = (str(path), os.stat(path).st_mtime_ns) if path is not None else (None, 0.0)
        with self._lock:
            if self._model is None or key != self._key:
                logger.info("loading %s", f"coefficient checkpoint {path}" if path else f"stock {self.config.backbone}")
                self._model, self._key = build_model(self.config, path), key
            return self._model, key[0]
