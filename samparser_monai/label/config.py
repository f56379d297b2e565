# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""What the MONAI Label app is told with ``--conf key value``: model, presets, prompt defaults, where things live."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from samparser_monai.networks.artefacts import read_coefficient_checkpoint
from samparser_monai.networks.backbones import BACKBONES
from samparser_monai.networks.runtime import RUNTIMES
from samparser_monai.transforms.intensity import INTENSITY_PRESETS

__all__ = ["CONF_KEYS", "DEFAULT_CLICK_BOX_MM", "LabelConfig", "default_repo_root"]

#: Side of the box grown around foreground clicks, in millimetres (see docs/monailabel.md for how it was chosen).
DEFAULT_CLICK_BOX_MM = 16.0

#: Memory for the slice embeddings the app keeps between requests (MB): about 30 LiteMedSAM volumes of 35 slices.
DEFAULT_EMBEDDING_CACHE_MB = 4096.0

#: ``--conf`` keys of the app and what each one sets.
CONF_KEYS = {
    "backbone": "SAM backbone: lite_medsam (default, offline weights), vit_b, vit_l, vit_h or tiny (tests)",
    "checkpoint": "base SAM checkpoint of vit_b/l/h (the official sam_vit_*.pth file)",
    "coefficients": "SAM-PARSER coefficient checkpoint to start from (bundle/models/model.pt); default: none",
    "preset": "method preset of training, a configs/methods/<name>.json (default parser_paper)",
    "intensity": "intensity preset of the model: mr (default), ct_abdomen, ct_liver, ...",
    "labels": "comma-separated label names the model offers (default: object)",
    "repo_root": "folder holding bundle/ and configs/ (default: this package's checkout)",
    "device": "torch device (default: cuda if available, else cpu)",
    "axis": "slicing axis of the RAS-oriented volume (default 2: axial)",
    "batch_size": "slices per encoder pass (default 8)",
    "click_box_mm": f"side of the box grown around clicks, in mm (default {DEFAULT_CLICK_BOX_MM:g})",
    "retain_host_memory": "true (default): keep freed host memory for the next request (a CPU forward about 2x "
    "faster, the peak host memory kept); false: return it to the system",
    "runtime": "image encoder runtime: torch (default, prepared for inference), onnxruntime (the fastest on a "
    "2-core CPU, same masks; the cpu extra), torch-bf16 (CPUs with native bfloat16) or eager (as built)",
    "threads": "intra-op CPU threads of inference (default 0: every core)",
    "embedding_cache_mb": f"memory for slice embeddings kept between requests on an image (default "
    f"{DEFAULT_EMBEDDING_CACHE_MB:g}; 0: none): a second prompt on the same image then runs only the decoder",
}

_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def default_repo_root() -> Path:
    """The checkout this package runs from (``bundle/`` and ``configs/`` live next to ``samparser_monai/``)."""
    return Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class LabelConfig:
    """The app's settings, checked once at start-up.

    Attributes:
        backbone: SAM backbone name.
        base_checkpoint: base SAM checkpoint (ViT backbones), or None.
        coefficients: coefficient checkpoint to start from, or None for the stock base model.
        preset: training method preset name.
        intensity: intensity preset of the model (training and inference use the same one).
        labels: label names the model offers to the client.
        repo_root: folder holding ``bundle/configs/train.json`` and ``configs/methods/``.
        device: torch device of inference.
        axis: slicing axis of the RAS-oriented volume.
        batch_size: slices per encoder pass.
        click_box_mm: side of the box grown around clicks, in millimetres.
        retain_host_memory: keep host memory freed between requests and training steps in the process
            (:func:`~samparser_monai.engines.retain_freed_host_memory`).
        runtime: image encoder runtime (:data:`~samparser_monai.networks.runtime.RUNTIMES`).
        threads: intra-op CPU threads (0: every core).
        embedding_cache_mb: memory bound of the slice embeddings kept between requests.
    """

    backbone: str = "lite_medsam"
    base_checkpoint: str | None = None
    coefficients: str | None = None
    preset: str = "parser_paper"
    intensity: str = "mr"
    labels: tuple[str, ...] = ("object",)
    repo_root: Path = field(default_factory=default_repo_root)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    axis: int = 2
    batch_size: int = 8
    click_box_mm: float = DEFAULT_CLICK_BOX_MM
    retain_host_memory: bool = True
    runtime: str = "torch"
    threads: int = 0
    embedding_cache_mb: float = DEFAULT_EMBEDDING_CACHE_MB

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any]) -> LabelConfig:
        """Settings from MONAI Label's ``conf`` (strings); unknown keys are left to MONAI Label.

        Raises:
            ValueError: an unknown backbone or intensity preset, or a number that is not one (one sentence).
            FileNotFoundError: a checkpoint file that does not exist.
        ExportError: a coefficient checkpoint that holds no coefficient state (a ValueError).
        """
        values: dict[str, Any] = {k: conf[k] for k in CONF_KEYS if conf.get(k) not in (None, "")}
        backbone = values.get("backbone", cls.backbone)
        if backbone not in BACKBONES:
            raise ValueError(f"Unknown backbone {backbone!r} in --conf backbone; use one of {sorted(BACKBONES)}.")
        intensity = values.get("intensity", cls.intensity)
        if intensity not in INTENSITY_PRESETS:
            raise ValueError(
                f"Unknown intensity preset {intensity!r} in --conf intensity; use one of {sorted(INTENSITY_PRESETS)}."
            )
        for key in ("checkpoint", "coefficients"):
            if key in values and not os.path.isfile(values[key]):
                raise FileNotFoundError(f"--conf {key} '{values[key]}' does not exist; pass an existing file.")
        if "coefficients" in values:
            read_coefficient_checkpoint(values["coefficients"])  # one sentence now, not at the first request
        runtime = values.get("runtime", cls.runtime)
        if runtime not in RUNTIMES:
            raise ValueError(f"Unknown runtime {runtime!r} in --conf runtime; use one of {list(RUNTIMES)}.")
        numbers = {"axis": int, "batch_size": int, "click_box_mm": float, "threads": int, "embedding_cache_mb": float}
        for key, kind in numbers.items():
            if key in values:
                try:
                    values[key] = kind(values[key])
                except ValueError as err:
                    raise ValueError(f"--conf {key} must be a number, got {values[key]!r}.") from err
        if "retain_host_memory" in values:
            flag = str(values["retain_host_memory"]).strip().lower()
            if flag not in _BOOLEANS:
                raise ValueError(
                    f"--conf retain_host_memory must be true or false, got {values['retain_host_memory']!r}."
                )
            values["retain_host_memory"] = _BOOLEANS[flag]
        if "labels" in values:
            values["labels"] = tuple(n.strip() for n in str(values["labels"]).split(",") if n.strip())
        if "repo_root" in values:
            values["repo_root"] = Path(values["repo_root"])
        if "checkpoint" in values:
            values["base_checkpoint"] = values.pop("checkpoint")
        return cls(**values)

    @property
    def train_config(self) -> Path:
        """The bundle's training config."""
        return self.repo_root / "bundle" / "configs" / "train.json"

    @property
    def preset_file(self) -> Path:
        """The method preset layered onto the training config."""
        return self.repo_root / "configs" / "methods" / f"{self.preset}.json"

    def preset_network_kwargs(self) -> dict[str, Any]:
        """``network_def#...`` entries of the method preset (e.g. ``lora_rank``), or none without the file."""
        if not self.preset_file.is_file():
            return {}
        preset = json.loads(self.preset_file.read_text())
        return {k.split("#", 1)[1]: v for k, v in preset.items() if k.startswith("network_def#")}
