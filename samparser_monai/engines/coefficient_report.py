# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""How far the SVD coefficients moved from their pretrained values, reported every epoch.

A coefficient that never moves is a method that is present and inert: with one learning rate shared with the mask
decoder, SAM-PARSER's coefficients changed by under 1% and the result equalled decoder-only fine-tuning. This handler
makes that visible in every training run: a console line and TensorBoard scalars per group of decomposed layers.
"""

from __future__ import annotations

import logging
import os

from ignite.engine import Engine, Events
from monai.utils import optional_import

from samparser_monai.networks.param_groups import unwrap_model
from samparser_monai.networks.svd import coefficient_movement, format_movement

SummaryWriter, _has_tensorboard = optional_import("torch.utils.tensorboard", name="SummaryWriter")

__all__ = ["CoefficientMovementReport"]

logger = logging.getLogger(__name__)


class CoefficientMovementReport:
    """At the end of every ``interval`` epochs, the median and largest ``|s - s0| / s0`` per group of coefficients.

    Prints ``coefficients moved (epoch 3): neck 512: median 4.02%, max 12.13% | all 512: ...``, writes TensorBoard
    scalars ``coefficients/<group>/median`` and ``.../max`` (in percent) to ``log_dir`` when given, and keeps the last
    figures in ``engine.state.coefficient_movement``. A network without SVD coefficients is reported once and then
    left alone. The final figures are also stored in every coefficient checkpoint
    (:func:`~samparser_monai.networks.coefficient_state`).

    Args:
        network: the trained SamParser (or a DDP wrapper of one).
        log_dir: TensorBoard folder, or ``None`` for the console only.
        interval: report every this many epochs.
    """

    def __init__(self, network, log_dir: str | os.PathLike | None = None, interval: int = 1) -> None:
        self.network, self.log_dir, self.interval = network, log_dir, max(1, int(interval))
        self._writer = None

    def attach(self, engine: Engine) -> None:
        """Report when every ``interval``-th epoch completes."""
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        movement = coefficient_movement(unwrap_model(self.network))
        engine.state.coefficient_movement = movement
        epoch = engine.state.epoch
        print(f"coefficients moved (epoch {epoch}): {format_movement(movement)}", flush=True)
        if not movement or self.log_dir is None:
            return
        if self._writer is None:
            if not _has_tensorboard:
                logger.warning("tensorboard is not installed: coefficient movement goes to the console only.")
                self.log_dir = None
                return
            self._writer = SummaryWriter(log_dir=os.fspath(self.log_dir))
        for group, row in movement.items():
            self._writer.add_scalar(f"coefficients/{group}/median", 100 * row["median"], epoch)
            self._writer.add_scalar(f"coefficients/{group}/max", 100 * row["max"], epoch)
        self._writer.flush()
