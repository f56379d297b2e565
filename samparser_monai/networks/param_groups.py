# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Optimizer parameter groups: the SVD coefficients get their own learning rate and weight decay.

Singular values are large (LiteMedSAM's neck: median 1.0 and 2.2, up to 19) compared with what an AdamW step moves a
parameter (about the learning rate), while decoder weights are small. With one learning rate for both, the
coefficients hardly move and SAM-PARSER behaves as decoder-only fine-tuning; with weight decay they are also pulled
toward 0 rather than toward their pretrained values. Every place that trains (the bundle's ``train.json``, the MONAI
Label training task, ``samparser-demo``, the benchmarks) builds its optimizer from :func:`parameter_groups`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from samparser_monai.networks.svd import svd_layers

__all__ = [
    "DEFAULT_COEFFICIENT_LEARNING_RATE",
    "DEFAULT_COEFFICIENT_PARAMETRIZATION",
    "parameter_groups",
    "unwrap_model",
]

#: The defaults of ``bundle/configs/train.json`` (``coefficient_learning_rate``, ``coefficient_parametrization``),
#: chosen by validation Dice on the dev split (``scripts/sweep_coefficients.py``; docs/benchmarks.md).
DEFAULT_COEFFICIENT_LEARNING_RATE = 1e-1
DEFAULT_COEFFICIENT_PARAMETRIZATION = "additive"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (``model`` itself otherwise)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def parameter_groups(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float = 0.0,
    coefficient_learning_rate: float | None = None,
    coefficient_weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Two optimizer parameter groups of the trainable parameters: SVD coefficients, and everything else.

    Args:
        model: a SamParser (or a DDP wrapper of one); only parameters with ``requires_grad`` are included.
        learning_rate: learning rate of the other trainable parameters (mask decoder, LoRA adapters, full encoder).
        weight_decay: their weight decay.
        coefficient_learning_rate: learning rate of the coefficients; ``None``: ``learning_rate``.
        coefficient_weight_decay: weight decay of the coefficients (default 0). With the relative
            parametrization the trainable tensor is a log-scale that is 0 at the pretrained values, so decay pulls
            toward the pretrained model; with the additive one it pulls the singular values toward 0.

    Returns:
        ``[{"name": "coefficients", "params", "lr", "weight_decay"}, {"name": "other", ...}]``, leaving out an empty
        group, for any ``torch.optim`` optimizer.

    Raises:
        ValueError: a learning rate that is not positive, or a model with nothing to train.
    """
    coefficient_learning_rate = learning_rate if coefficient_learning_rate is None else coefficient_learning_rate
    for name, value in (("learning_rate", learning_rate), ("coefficient_learning_rate", coefficient_learning_rate)):
        if not float(value) > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}.")
    network = unwrap_model(model)
    coefficient_ids = {id(layer.coefficients) for layer in svd_layers(network).values()}
    coefficients, other = [], []
    for param in network.parameters():
        if param.requires_grad:
            (coefficients if id(param) in coefficient_ids else other).append(param)
    if not coefficients and not other:
        raise ValueError("The model has no trainable parameter: check its trainable policy.")
    groups = [
        {
            "name": "coefficients",
            "params": coefficients,
            "lr": float(coefficient_learning_rate),
            "weight_decay": float(coefficient_weight_decay),
        },
        {"name": "other", "params": other, "lr": float(learning_rate), "weight_decay": float(weight_decay)},
    ]
    return [group for group in groups if group["params"]]
