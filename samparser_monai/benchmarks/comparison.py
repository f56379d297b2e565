# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Accuracy of every fine-tuning method through the bundle itself: train with ``train.json`` and a method preset,
evaluate the saved checkpoint with ``evaluate.json``, and collect per-label Dice and HD95.

Every method runs the same configs with the same overrides (budget, seed, box jitter, split); only the method
preset differs. The zero-shot row evaluates the stock model (``zero_shot`` true in ``evaluate.json``). Runs whose
network caches its trunk features (zero-shot, ``decoder_only``, ``parser_paper``: the stock frozen trunk) share one
cache per trunk weights, so the trunk runs once per slice for all of them; ``parser_official`` keeps the original
code's behaviour (no cache). Exact: a cache is shared only between equal trunk weights.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import logging
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from samparser_monai.engines.workflow import TimingReport, latest_checkpoint
from samparser_monai.networks.trunk_cache import TrunkFeatureCache, trunk_fingerprint

__all__ = [
    "BUDGETS",
    "TRAINING_PROMPTS",
    "ZERO_SHOT",
    "Budget",
    "add_training_prompt_arguments",
    "compare_methods",
    "run_bundle",
    "summarise_metrics",
    "training_prompts",
]

logger = logging.getLogger(__name__)

#: Name of the row that evaluates the stock model without training.
ZERO_SHOT = "zero_shot"

#: ``train.json`` ids of the prompt shares training draws (clicks, the previous slice's mask) -> the flag that pins
#: each in a benchmark script. A benchmark writes the values it used next to its rows, since a row trained with other
#: prompts is another model (the bundle's defaults changed once: docs/benchmarks.md, "The default training prompts").
TRAINING_PROMPTS = {
    "train_click_fraction": "--train-click-fraction",
    "train_mask_prompt_fraction": "--train-mask-prompt-fraction",
}


def add_training_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--train-click-fraction`` and ``--train-mask-prompt-fraction`` (default: the bundle's) to ``parser``."""
    parser.add_argument("--train-click-fraction", type=float, default=None,
                        help="share of training samples prompted with clicks (default: train.json's)")  # fmt: skip
    parser.add_argument("--train-mask-prompt-fraction", type=float, default=None,
                        help="share of training samples also given the previous slice's mask (default: train.json's; "
                        "0 trains on boxes alone, as every table measured before the default changed)")  # fmt: skip


def training_prompts(args: argparse.Namespace, repo_root: str | os.PathLike) -> dict[str, float]:
    """The training prompt shares a benchmark trains with: those given on its command line, else ``train.json``'s.

    Raises:
        ValueError: a share outside [0, 1].
    """
    defaults = json.loads((Path(repo_root) / "bundle" / "configs" / "train.json").read_text())
    shares = {}
    for key, flag in TRAINING_PROMPTS.items():
        given = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        value = float(defaults[key] if given is None else given)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{flag} {value:g} is not a share: give a value from 0 to 1.")
        shares[key] = value
    return shares


@dataclass(frozen=True)
class Budget:
    """Training and evaluation budget shared by every method.

    Attributes:
        epochs: training epochs.
        samples_per_epoch: training slices drawn per epoch (0: every slice of the training split).
        batch_size: slices per training step.
        val_cases: validation cases evaluated (0: the whole validation split).
        num_workers: data loader workers of the training run.
    """

    epochs: int
    samples_per_epoch: int
    batch_size: int
    val_cases: int
    num_workers: int = 0

    def describe(self) -> str:
        """One line for the report."""
        samples = "all training slices" if not self.samples_per_epoch else f"{self.samples_per_epoch} slices"
        cases = "all validation cases" if not self.val_cases else f"the first {self.val_cases} validation cases"
        return f"{self.epochs} epoch(s) of {samples}, batch {self.batch_size}; evaluated on {cases}"


#: ``quick`` fits a 2-core CPU in minutes (a smoke-level budget: it shows the pipeline, not converged accuracy);
#: ``full`` is the comparison to quote (meant for a GPU).
BUDGETS: dict[str, Budget] = {
    "quick": Budget(epochs=1, samples_per_epoch=16, batch_size=2, val_cases=1),
    "full": Budget(epochs=3, samples_per_epoch=0, batch_size=8, val_cases=0, num_workers=4),
}


def run_bundle(
    config_files: Sequence[str | os.PathLike],
    overrides: Mapping[str, Any],
    run_id: str,
    trunk_caches: dict[str, TrunkFeatureCache] | None = None,
    cache_bytes: int = 4 << 30,
) -> ConfigParser:
    """Run ``initialize`` then ``run_id`` of a bundle config in this process, as ``monai.bundle run`` would.

    Args:
        config_files: config files, later ones overriding earlier ones (bundle config, then presets).
        overrides: id -> value overrides, as ``--id value`` on the command line.
        run_id: the expression list to run (``training``, ``evaluating``).
        trunk_caches: feature caches shared between runs, by :func:`trunk_fingerprint`: a network that enables
            its own cache (``cache_trunk``; the rule of when caching is exact stays the network's) gets the shared
            cache of its trunk weights instead, so networks with other trunk weights never share features.
        cache_bytes: memory budget of each new shared cache (kept on the device that computed the features).

    Returns:
        The parser, so callers can read what the run produced.
    """
    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files])
    parser.update(dict(overrides))
    parser.get_parsed_content("initialize")  # seeds first: the network's own initialisation (LoRA) draws from it
    network = parser.get_parsed_content("network_def")
    if trunk_caches is not None and getattr(network, "trunk_cache", None) is not None:
        key = trunk_fingerprint(network.image_encoder)
        network.trunk_cache = trunk_caches.setdefault(key, TrunkFeatureCache(cache_bytes, device=None))
    parser.get_parsed_content(run_id)
    return parser


def summarise_metrics(metrics_csv: str | os.PathLike) -> list[dict[str, Any]]:
    """Per-label mean and SD of Dice and the mean finite HD95 from an evaluation's ``metrics.csv``.

    Cases where a label was predicted empty have an infinite HD95: they are counted (``empty``), not averaged.
    """
    with open(metrics_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    out = []
    for label in sorted({int(r["label"]) for r in rows}):
        picked = [r for r in rows if int(r["label"]) == label and not math.isnan(float(r["dice"]))]
        dice = [float(r["dice"]) for r in picked]
        hd95 = [float(r["hd95"]) for r in picked]
        finite = [h for h in hd95 if math.isfinite(h)]
        out.append(
            {
                "label": label,
                "label_name": picked[0]["label_name"] if picked else str(label),
                "cases": len(picked),
                "dice": statistics.fmean(dice) if dice else math.nan,
                "dice_sd": statistics.stdev(dice) if len(dice) > 1 else 0.0,
                "hd95": statistics.fmean(finite) if finite else math.nan,
                "empty": len(hd95) - len(finite),
            }
        )
    return out


def _training_timing(parser: ConfigParser) -> dict[str, float]:
    """Mean data wait and step time of a finished training run (its ``TimingReport``; empty when switched off)."""
    for handler in parser.get_parsed_content("train#handlers"):
        if isinstance(handler, TimingReport):
            return handler.stats()
    return {}


def _append_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def _compare_one(
    method: str,
    files: list[Path],
    run: dict[str, Any],
    shared: dict[str, TrunkFeatureCache],
    cache_bytes: int,
    csv_path: Path,
) -> list[dict[str, Any]]:
    """Train (unless zero-shot) and evaluate one method; its rows, appended to ``csv_path``.

    ``files``: ``train.json``, the dataset preset and the method preset (``evaluate.json`` is read beside
    ``train.json``); ``run``: the overrides, ``bundle_root`` the method's folder.
    """
    root = Path(run["bundle_root"])
    for stale in ("models", "evaluation"):  # outputs of an earlier comparison in the same folder
        shutil.rmtree(root / stale, ignore_errors=True)
    start = time.perf_counter()
    checkpoint, timing = None, {}
    if method != ZERO_SHOT:
        parser = run_bundle(files, run, "training", shared, cache_bytes)
        timing = _training_timing(parser)
        checkpoint = latest_checkpoint(root / "models")
        if checkpoint is None:
            raise RuntimeError(f"Training {method} saved no checkpoint in {root / 'models'}.")
    trained = time.perf_counter()
    gc.collect()
    evaluation = {**run, "eval_output_dir": str(root / "evaluation")}
    evaluation.update({"zero_shot": True} if checkpoint is None else {"eval_checkpoint": checkpoint})
    run_bundle(
        [files[0], files[0].with_name("evaluate.json"), *files[1:]], evaluation, "evaluating", shared, cache_bytes
    )
    done = time.perf_counter()
    rows = [
        {
            "method": method,
            **row,
            "train_s": round(trained - start, 1),
            "eval_s": round(done - trained, 1),
            "step_ms": round(timing["step_ms"], 1) if timing else "",
            "data_ms": round(timing["data_ms"], 1) if timing else "",
        }
        for row in summarise_metrics(root / "evaluation" / "metrics.csv")
    ]
    _append_rows(csv_path, rows)
    logger.info("%s: %s", method, ", ".join(f"{r['label_name']} Dice {r['dice']:.4f}" for r in rows))
    return rows


def compare_methods(
    methods: Sequence[str],
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    budget: Budget,
    repo_root: str | os.PathLike,
    dataset_preset: str = "msd_hippocampus",
    seed: int = 0,
    device: str | None = None,
    cache_gb: float = 4.0,
    extra: Mapping[str, Any] | None = None,
    csv_path: str | os.PathLike | None = None,
    on_rows: Callable[[str, list[dict[str, Any]]], None] | None = None,
    on_failure: Callable[[str, Exception], None] | None = None,
) -> list[dict[str, Any]]:
    """Fine-tune and evaluate each method (``ZERO_SHOT``: evaluate only), appending its rows to a CSV as it finishes.

    Each method starts afresh: checkpoints and evaluations left in its folder by an earlier comparison are removed
    first, so a shorter rerun never scores an older, longer run's checkpoint.

    Args:
        methods: names of ``configs/methods/*.json`` presets, or :data:`ZERO_SHOT`.
        dataset_dir: the dataset (MSD layout for the hippocampus preset).
        output_dir: one bundle root per method below it, and the CSV.
        budget: the shared training and evaluation budget.
        repo_root: the repository holding ``bundle/`` and ``configs/``.
        dataset_preset: name of the ``configs/datasets`` preset.
        seed: seed of the split, the sampling, the box jitter and the initialisation.
        device: torch device (default: the bundle's choice).
        cache_gb: memory budget of the shared trunk cache (kept on the device that computed the features).
        extra: more overrides for every run (e.g. ``{"backbone": "tiny"}``).
        csv_path: the CSV rows are appended to (default ``<output_dir>/accuracy.csv``).
        on_rows: called with each method and its rows once they are in the CSV (e.g. to rewrite a table, so that
            it never lags a finished method).
        on_failure: called with a method and its error when the method fails (training or evaluation raises, or
            saves no checkpoint); the comparison then goes on with the next method. Without it the error is raised.

    Returns:
        One row per method and label: Dice mean/SD, HD95, empty predictions, training and evaluation seconds, and the
        training's mean step time and data wait per step in ms (blank for zero-shot).
    """
    root, out = Path(repo_root), Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    bundle = root / "bundle" / "configs"
    shared: dict[str, TrunkFeatureCache] = {}
    cache_bytes = int(cache_gb * (1 << 30))
    common: dict[str, Any] = {
        "dataset_dir": str(dataset_dir),
        "seed": seed,
        "epochs": budget.epochs,
        "samples_per_epoch": budget.samples_per_epoch,
        "batch_size": budget.batch_size,
        "num_workers": budget.num_workers,
        "val_interval": budget.epochs + 1,  # no validation while training: every method is scored the same way
        "use_tensorboard": False,
        **({"device": f"$torch.device('{device}')"} if device else {}),
        **dict(extra or {}),
    }
    if budget.val_cases:
        common["validate#datalist"] = f"$@datalists[1][:{budget.val_cases}]"
    results: list[dict[str, Any]] = []
    for method in methods:
        try:
            preset = root / "configs" / "methods" / f"{'decoder_only' if method == ZERO_SHOT else method}.json"
            files = [bundle / "train.json", root / "configs" / "datasets" / f"{dataset_preset}.json", preset]
            run = {**common, "bundle_root": str(out / method)}
            rows = _compare_one(method, files, run, shared, cache_bytes, Path(csv_path or out / "accuracy.csv"))
        except Exception as err:  # with on_failure: reported, and the comparison goes on
            if on_failure is None:
                raise
            on_failure(method, err)
            continue
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        results.extend(rows)
        if on_rows is not None:
            on_rows(method, rows)
    return results
