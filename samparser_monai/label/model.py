# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""The network the app serves: the base SAM plus the newest coefficient checkpoint, rebuilt when that file changes
(a finished training run publishes a new one), merged for stock inference speed."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from samparser_monai.label.config import LabelConfig
from samparser_monai.networks import SamParser
from samparser_monai.networks.artefacts import merged_model
from samparser_monai.networks.runtime import runtime_cache_dir, use_runtime

__all__ = ["LiveModel", "build_model"]

logger = logging.getLogger(__name__)


def build_model(config: LabelConfig, checkpoint: str | os.PathLike | None = None) -> SamParser:
    """The served network: :func:`~samparser_monai.networks.merged_model` of the app's base and ``checkpoint``, with
    the method preset's ``network_def#...`` options (e.g. the LoRA rank), its encoder in the app's runtime."""
    model = merged_model(
        config.backbone, config.base_checkpoint, checkpoint, config.device, **config.preset_network_kwargs()
    )
    return use_runtime(model, config.runtime, config.threads, runtime_cache_dir(checkpoint))


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

    @property
    def version(self) -> tuple[str | None, float] | None:
        """What identifies the weights served now: the checkpoint's path and modification time (None before the
        first :meth:`current`)."""
        return self._key

    def current(self) -> tuple[SamParser, str | None]:
        """The network to use now and the checkpoint it holds (None: the stock base model)."""
        path = self.locate()
        key = (str(path), os.stat(path).st_mtime_ns) if path is not None else (None, 0.0)
        with self._lock:
            if self._model is None or key != self._key:
                logger.info("loading %s", f"coefficient checkpoint {path}" if path else f"stock {self.config.backbone}")
                self._model, self._key = build_model(self.config, path), key
            return self._model, key[0]
