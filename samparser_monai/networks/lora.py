# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""LoRA on SAM's image encoder through the ``peft`` library: the low-rank baseline SAM-PARSER is compared with
(r = 4 on the attention qkv projections, as SAMed; 147,456 encoder parameters on ViT-B)."""

from __future__ import annotations

from collections.abc import Sequence

from monai.utils import optional_import
from torch import nn

__all__ = ["apply_lora", "is_lora_parameter", "merge_lora"]


def _peft():
    """The peft module, imported on first use (it imports transformers: seconds, only for LoRA runs)."""
    peft, has_peft = optional_import("peft")
    if not has_peft:
        raise ImportError("trainable='lora' needs the peft package: pip install -e '.[lora]'.")
    return peft


def apply_lora(root: nn.Module, rank: int = 4, targets: Sequence[str] = ("qkv",)) -> list[str]:
    """Add LoRA adapters (alpha = rank, no dropout, B initialised to zero: the model is unchanged) to the linear
    layers of ``root`` whose names end with one of ``targets``; returns their names."""
    peft = _peft()
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), lora_dropout=0.0, bias="none")
    peft.inject_adapter_in_model(config, root)
    return [name for name, m in root.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


def is_lora_parameter(name: str) -> bool:
    """Whether a parameter name belongs to a LoRA adapter."""
    return ".lora_A." in name or ".lora_B." in name


def merge_lora(root: nn.Module) -> list[str]:
    """Fold every LoRA adapter into its base layer and put the plain layer back (stock state-dict keys)."""
    if not any(is_lora_parameter(name) for name, _ in root.named_parameters()):
        return []
    peft = _peft()
    names = [name for name, m in root.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    for name in names:
        layer = root.get_submodule(name)
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, child, layer.get_base_layer())
    return names
