# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Fine-tuning from the app's labelled studies with the bundle's own recipe (``bundle/configs/train.json`` plus a
method preset), and publishing the best coefficient checkpoint where the infer task picks it up."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigWorkflow
from monai.transforms import LoadImage

from samparser_monai.data.datalists import case_id
from samparser_monai.engines.workflow import latest_checkpoint
from samparser_monai.files import staged_file
from samparser_monai.label.config import LabelConfig
from samparser_monai.networks.artefacts import read_coefficient_checkpoint
from samparser_monai.networks.param_groups import DEFAULT_COEFFICIENT_LEARNING_RATE

__all__ = ["TRAIN_OPTIONS", "count_classes", "fine_tune", "link_dataset", "publish_checkpoint", "train_options"]

#: Options a client may set per training request (bundle ids) and their defaults.
TRAIN_OPTIONS: dict[str, Any] = {
    "epochs": 10,
    "samples_per_epoch": 200,
    "batch_size": 4,
    "learning_rate": 1e-4,
    "coefficient_learning_rate": DEFAULT_COEFFICIENT_LEARNING_RATE,
    "val_fraction": 0.2,
    "seed": 0,
    # training prompts, as the bundle's train.json: clicks make a model that answers clicks (served the clicks
    # themselves), mask prompts one that is given the previous slice's mask as it propagates
    "train_click_fraction": 0.25,
    "train_mask_prompt_fraction": 0.5,
}
#: options that are shares of the training samples, from 0 to 1
_SHARES = ("val_fraction", "train_click_fraction", "train_mask_prompt_fraction")


def train_options(request: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`TRAIN_OPTIONS` of a request, typed as the defaults (clients send strings too).

    Raises:
        ValueError: a value that is not a number of the option's kind (one sentence).
    """
    options = {}
    for key, default in TRAIN_OPTIONS.items():
        value = request.get(key, default)
        try:
            options[key] = type(default)(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"Training option {key} must be a {type(default).__name__}, got {value!r}.") from err
        if key in _SHARES and not 0.0 <= options[key] <= 1.0:
            raise ValueError(f"Training option {key} must be a share from 0 to 1, got {value!r}.")
    return options


def link_dataset(items: Sequence[Mapping[str, str]], folder: str | os.PathLike) -> Path:
    """A ``folders``-format dataset (``images/``, ``labels/``, paired by case id) of links to the studies.

    The folder is rebuilt from scratch; files are copied where links cannot be made.
    """
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    for item in items:
        case = case_id(item["image"])
        for key, sub in (("image", "images"), ("label", "labels")):
            source = Path(item[key]).resolve()
            target = folder / sub / (case + source.name[len(case_id(source)) :])
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                target.symlink_to(source)
            except OSError:
                shutil.copyfile(source, target)
    return folder


def count_classes(items: Sequence[Mapping[str, str]]) -> int:
    """Background plus the largest label id found in the label maps."""
    loader = LoadImage(image_only=True)
    return 1 + max(int(loader(item["label"]).max()) for item in items)


def publish_checkpoint(checkpoint: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Write the coefficient state of ``checkpoint`` to ``target`` atomically (readers see the old or the new file).

    Raises:
        FileNotFoundError, ValueError: ``checkpoint`` is missing or holds no coefficient state.
    """
    state = read_coefficient_checkpoint(checkpoint)
    target = Path(target)
    with staged_file(target) as partial:
        torch.save(state, partial)
    return target


def fine_tune(
    items: Sequence[Mapping[str, str]],
    config: LabelConfig,
    run_dir: str | os.PathLike,
    options: Mapping[str, Any] | None = None,
    start_from: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run the bundle's training on ``items`` (``image``/``label`` paths) and return what it achieved.

    Args:
        items: the labelled studies.
        config: the app's settings (backbone, base checkpoint, preset, intensity, device, where the bundle is).
        run_dir: working folder of the run (its dataset links and ``bundle/`` root, replaced on every run).
        options: :data:`TRAIN_OPTIONS` values.
        start_from: a coefficient checkpoint to continue from (its coefficients and policy are kept).

    Returns:
        ``checkpoint`` (the best validated coefficient state of the run) and statistics of the run.

    Raises:
        FileNotFoundError: the bundle's ``train.json`` or the method preset is not where ``repo_root`` says.
        ValueError: fewer than two labelled studies.
    """
    for path, conf in ((config.train_config, "repo_root"), (config.preset_file, "preset")):
        if not path.is_file():
            raise FileNotFoundError(
                f"'{path}' does not exist: pass --conf {conf} so that training finds the bundle and its presets."
            )
    if len(items) < 2:
        raise ValueError(
            f"Training needs at least 2 studies with a final label; {len(items)} found: save more labels first."
        )
    options = {**TRAIN_OPTIONS, **dict(options or {})}
    run_dir = Path(run_dir)
    bundle_root = run_dir / "bundle"
    shutil.rmtree(bundle_root / "models", ignore_errors=True)
    overrides: dict[str, Any] = {
        **options,
        "bundle_root": str(bundle_root),
        "dataset_dir": str(link_dataset(items, run_dir / "dataset")),
        "dataset_format": "folders",
        "backbone": config.backbone,
        "base_checkpoint": config.base_checkpoint,
        "intensity": config.intensity,
        "num_classes": count_classes(items),
        "device": f"$torch.device({config.device!r})",
        "retain_host_memory": config.retain_host_memory,
    }
    if start_from is not None:
        state = read_coefficient_checkpoint(start_from)
        overrides.update(coefficients=state["coefficients"], trainable=state.get("trainable", "parser"))
        # keep the parametrization it was trained with (checkpoints before it existed were additive)
        overrides["coefficient_parametrization"] = state.get("coefficient_parametrization", "additive")
        overrides["network"] = (
            f"$samparser_monai.networks.load_coefficient_state(@network_def, {str(start_from)!r}).to(@device)"
        )
    start = time.perf_counter()
    workflow = ConfigWorkflow(
        config_file=[str(config.train_config), str(config.preset_file)],
        logging_file=False,  # the server's logging stays as it is
        workflow_type="train",
        run_id="training",
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    state = workflow.parser.get_parsed_content("validate#evaluator").state
    train, val = workflow.parser.get_parsed_content("datalists")
    workflow.finalize()
    best = bundle_root / "models" / "model.pt"
    checkpoint = best if best.is_file() else latest_checkpoint(bundle_root / "models")
    if checkpoint is None:
        raise RuntimeError(f"Training saved no checkpoint in '{bundle_root / 'models'}'.")
    return {
        "checkpoint": str(checkpoint),
        "started_from": str(start_from) if start_from else None,
        "best_val_mean_dice": float(state.best_metric) if state.best_metric_epoch > 0 else None,
        "best_epoch": int(state.best_metric_epoch),
        "epochs": int(options["epochs"]),
        "train_cases": len(train),
        "val_cases": len(val),
        "seconds": round(time.perf_counter() - start, 1),
        "options": dict(options),
    }
