# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Coefficient state: what a SAM-PARSER fine-tune saves (only what it trained) and how it is put back on its base.

A coefficient state is a small dict: the trainable tensors (SVD coefficients, mask decoder, or whatever the
``trainable`` policy trained, plus the running statistics of trained normalisation layers), the backbone name, the
coefficient targets, the policy and the sha256 of the base checkpoint. Loading it onto a model built from another
base checkpoint is refused with one sentence.

SVD coefficients are stored as the singular values ``s`` whatever the model's ``coefficient_parametrization`` (the
trainable tensor of a relative model is a log-scale; it is converted on the way in and out), so every checkpoint,
including those written before the relative parametrization existed, loads into a model of either parametrization.
The state also records how far the coefficients moved from their pretrained values (``coefficient_movement``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from samparser_monai.errors import unreadable_reason
from samparser_monai.networks.svd import coefficient_movement, svd_layers

__all__ = ["STATE_FORMAT", "coefficient_state", "load_coefficient_state", "save_coefficient_state", "trainable_keys"]

STATE_FORMAT = "samparser-monai/coefficients-v1"


def trainable_keys(model: nn.Module) -> list[str]:
    """State-dict keys of trainable parameters, and of the persistent buffers of modules that own one."""
    keys = []
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        own = list(module.named_parameters(recurse=False))
        trained = [name for name, p in own if p.requires_grad]
        keys += [dot + name for name in trained]
        if trained:
            persistent = [
                n for n, _ in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set
            ]
            keys += [dot + name for name in persistent]
    return keys


def coefficient_state(model: nn.Module) -> dict[str, Any]:
    """The coefficient state of a :class:`~samparser_monai.networks.SamParser` (tensors detached, on CPU).

    Besides the trained tensors it records ``coefficient_parametrization``, ``coefficient_movement`` (median and
    largest ``|s - s0| / s0`` per group of decomposed layers; see
    :func:`~samparser_monai.networks.svd.coefficient_movement`) and ``training_prompts`` (the prompt shares it was
    trained with, :attr:`~samparser_monai.networks.SamParser.training_prompts`).
    """
    full = model.state_dict()
    tensors = {k: full[k].detach().cpu().clone() for k in trainable_keys(model)}
    for name, layer in svd_layers(model).items():  # always the singular values s, whatever the parametrization
        if f"{name}.coefficients" in tensors:
            tensors[f"{name}.coefficients"] = layer.singular_values().detach().cpu().clone()
    return {
        "format": STATE_FORMAT,
        "backbone": model.backbone,
        "base_sha256": model.base_sha256,
        "coefficients": model.coefficient_targets,
        "trainable": model.trainable,
        "coefficient_parametrization": getattr(model, "coefficient_parametrization", "additive"),
        "coefficient_movement": coefficient_movement(model),
        "training_prompts": dict(getattr(model, "training_prompts", {})),
        "state_dict": tensors,
    }


def save_coefficient_state(model: nn.Module, path: str | os.PathLike) -> str:
    """Write :func:`coefficient_state` to ``path`` (parent folders created); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(coefficient_state(model), path)
    return path


def read_state_file(path: str | os.PathLike, name: str = "", hint: str = "") -> Any:
    """The object stored in a coefficient checkpoint file, read weights-only (no code in the file runs).

    The one place that reads these files: :func:`load_coefficient_state` and
    :func:`~samparser_monai.networks.artefacts.read_coefficient_checkpoint` both call it.

    Args:
        path: the file.
        name: how the sentence names the file (default ``'<path>'``).
        hint: what to do about it, appended to the sentence after a semicolon.

    Raises:
        ValueError: the file cannot be read (truncated, not a PyTorch file, or holding Python objects besides
            tensors); one complete sentence.
    """
    try:
        return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as err:  # junk bytes fail in many ways inside torch.load (IndexError, struct.error, ...)
        what = name or f"'{os.fspath(path)}'"
        raise ValueError(f"{what} could not be read: {unreadable_reason(err)}{'; ' + hint if hint else ''}.") from err


def load_coefficient_state(model: nn.Module, state: Mapping[str, Any] | str | os.PathLike) -> nn.Module:
    """Load a coefficient state (a dict or a file path) onto a model built from the same base; returns the model.

    Raises:
        ValueError: not a coefficient state, another base checkpoint or backbone, or other coefficient targets.
    """
    source = "This coefficient state"
    if isinstance(state, (str, os.PathLike)):
        source = f"'{os.fspath(state)}'"
        state = read_state_file(state)
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{source} is not a SAM-PARSER coefficient checkpoint (no '{STATE_FORMAT}' format tag).")
    if state["backbone"] != model.backbone or state["base_sha256"] != model.base_sha256:
        raise ValueError(
            f"{source} was trained on base {state['backbone']} with sha256 {state['base_sha256'][:16]}..., but this "
            f"model was built from {model.backbone} with sha256 {model.base_sha256[:16]}...: build the model from the "
            "same base checkpoint."
        )
    own = model.state_dict()
    foreign = [k for k in state["state_dict"] if k not in own]
    if foreign:
        raise ValueError(
            f"{source} holds {len(foreign)} tensors this model does not have (first: {foreign[0]}); it was saved with "
            f"coefficients={state['coefficients']!r}, this model uses coefficients={model.coefficient_targets!r}."
        )
    tensors = dict(state["state_dict"])
    layers = svd_layers(model)
    try:
        for name, layer in layers.items():  # stored as s: each layer converts to its own parametrization
            if f"{name}.coefficients" in tensors:
                layer.set_singular_values(tensors.pop(f"{name}.coefficients"))
    except ValueError as error:
        raise ValueError(f"{source} cannot be loaded: {error}") from None
    model.load_state_dict(tensors, strict=False)
    model.training_prompts = dict(state.get("training_prompts") or {})
    return model
