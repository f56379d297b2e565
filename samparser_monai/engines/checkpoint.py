# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Checkpoint objects for MONAI's CheckpointSaver / CheckpointLoader that hold only what was trained."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from samparser_monai.networks.param_groups import unwrap_model
from samparser_monai.networks.state import coefficient_state, load_coefficient_state

__all__ = ["TrainableState", "require_checkpoint"]


class TrainableState:
    """Presents a SamParser's coefficient state through ``state_dict`` / ``load_state_dict``.

    Use it in bundle configs in place of the network: ``"save_dict": {"model": "$TrainableState(@network)", ...}``.
    The checkpoint then holds the coefficients and the other trained tensors plus the base checkpoint's sha256, not
    the frozen encoder; loading it onto a model of another base is refused with one sentence.

    Args:
        network: a SamParser, or a DistributedDataParallel wrapper of one.
        training_prompts: the prompt shares training uses (``click_fraction``, ``mask_prompt_fraction``): set on the
            model and saved with it, so inference prompts the model as it was trained.
    """

    def __init__(self, network: nn.Module, training_prompts: Mapping[str, float] | None = None) -> None:
        self.network = network
        if training_prompts is not None:
            self.model.training_prompts = {k: float(v) for k, v in training_prompts.items()}

    @property
    def model(self) -> nn.Module:
        """The SamParser (unwrapped from DDP)."""
        return unwrap_model(self.network)

    def state_dict(self) -> dict[str, Any]:
        """The coefficient state (see :func:`~samparser_monai.networks.coefficient_state`)."""
        return coefficient_state(self.model)

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Load a coefficient state onto the network (``strict`` is accepted for ignite and ignored)."""
        load_coefficient_state(self.model, state)


def require_checkpoint(path: str | os.PathLike) -> str:
    """``path`` if it is a file; otherwise one sentence saying how to get one (for configs that load a checkpoint).

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Checkpoint '{path}' does not exist; train first (bundle/configs/train.json writes models/model.pt) or "
            "pass --ckpt_path <file>."
        )
    return os.fspath(path)
