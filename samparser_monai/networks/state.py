# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Coefficient state: what a SAM-PARSER fine-tune saves (only what it trained) and how it is put back on its base.

A coefficient state is a small dict: the trainable tensors (SVD coefficients, mask decoder, or whatever the
``trainable`` policy trained, plus the running statistics of trained normalisation layers), the backbone name, the
coefficient targets, the policy and the sha256 of the base checkpoint. Loading it onto a model built from another
base checkpoint is refused with one sentence.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

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
    """The coefficient state of a :class:`~samparser_monai.networks.SamParser` (tensors detached, on CPU)."""
    full = model.state_dict()
    return {
        "format": STATE_FORMAT,
        "backbone": model.backbone,
        "base_sha256": model.base_sha256,
        "coefficients": model.coefficient_targets,
        "trainable": model.trainable,
        "state_dict": {k: full[k].detach().cpu().clone() for k in trainable_keys(model)},
    }


def save_coefficient_state(model: nn.Module, path: str | os.PathLike) -> str:
    """Write :func:`coefficient_state` to ``path`` (parent folders created); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(coefficient_state(model), path)
    return path


def load_coefficient_state(model: nn.Module, state: Mapping[str, Any] | str | os.PathLike) -> nn.Module:
    """Load a coefficient state (a dict or a file path) onto a model built from the same base; returns the model.

    Raises:
        ValueError: not a coefficient state, another base checkpoint or backbone, or other coefficient targets.
    """
    source = "This coefficient state"
    if isinstance(state, (str, os.PathLike)):
        source = f"'{os.fspath(state)}'"
        state = torch.load(os.fspath(state), map_location="cpu", weights_only=True)
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
    model.load_state_dict(state["state_dict"], strict=False)
    return model
