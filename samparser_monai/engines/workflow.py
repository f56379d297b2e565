# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Small pieces the bundle configs call: datalists by dataset format, the checkpoint to resume, the run report."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import BasicTimeProfiler

from samparser_monai.data.datalists import folder_datalist, image_folder_datalist, msd_datalist, split_by_case
from samparser_monai.data.demo import DEMO_DATASET, make_demo_dataset
from samparser_monai.data.dicom_datalist import dicom_datalist

__all__ = [
    "DATASET_FORMATS",
    "RunReport",
    "TimingReport",
    "INFERENCE_SPLITS",
    "bundle_datalists",
    "dataset_items",
    "inference_datalist",
    "dataset_label_names",
    "latest_checkpoint",
]

logger = logging.getLogger(__name__)

#: ``dataset_format`` values of the bundle and the datalist each one reads from ``dataset_dir``.
DATASET_FORMATS = ("msd", "folders", "images_2d", "dicom")


def bundle_datalists(
    dataset_dir: str | os.PathLike,
    dataset_format: str = "msd",
    val_fraction: float = 0.2,
    seed: int = 0,
    demo_dir: str | os.PathLike | None = None,
) -> tuple[list[dict], list[dict]]:
    """Training and validation items of ``dataset_dir``, split by case.

    Args:
        dataset_dir: the data folder, or ``"demo"`` for the generated demo dataset (written once to ``demo_dir``).
        dataset_format: ``"msd"`` (dataset.json, imagesTr/, labelsTr/), ``"folders"`` (images/ and labels/ with the
            same file names), ``"images_2d"`` (images/ and masks/, PNG/JPG) or ``"dicom"`` (series folders and their
            DICOM-SEG objects anywhere below ``dataset_dir``).
        val_fraction: share of cases for validation.
        seed: seed of the split.
        demo_dir: where the demo dataset goes.

    Raises:
        ValueError: unknown format, or a split that leaves the training or validation side empty.
        FileNotFoundError: ``dataset_dir`` does not exist (one sentence naming it).
    """
    items = dataset_items(dataset_dir, dataset_format, demo_dir)
    train, val = split_by_case(items, val_fraction=val_fraction, seed=seed)
    if not train or not val:
        raise ValueError(
            f"{len(items)} items in '{dataset_dir}' give {len(train)} training and {len(val)} validation items: "
            "a run needs at least two cases."
        )
    return train, val


#: ``inference_split`` values of the bundle's inference config
INFERENCE_SPLITS = ("all", "training", "validation")


def inference_datalist(
    dataset_dir: str | os.PathLike,
    dataset_format: str = "msd",
    split: str = "all",
    val_fraction: float = 0.2,
    seed: int = 0,
    demo_dir: str | os.PathLike | None = None,
) -> list[dict]:
    """The items a batch inference run segments: every case of ``dataset_dir`` (``split="all"``), or one side of
    the training split (``"training"``, ``"validation"``: the same cases as :func:`bundle_datalists` gives).

    Raises:
        ValueError: unknown split or format.
    """
    if split not in INFERENCE_SPLITS:
        raise ValueError(f"Unknown inference_split {split!r}; use one of {list(INFERENCE_SPLITS)}.")
    if split == "all":
        return dataset_items(dataset_dir, dataset_format, demo_dir)
    train, val = bundle_datalists(dataset_dir, dataset_format, val_fraction, seed, demo_dir)
    return train if split == "training" else val


def dataset_items(
    dataset_dir: str | os.PathLike, dataset_format: str = "msd", demo_dir: str | os.PathLike | None = None
) -> list[dict]:
    """Every item of ``dataset_dir`` in ``dataset_format`` (see :func:`bundle_datalists`), unsplit.

    Raises:
        ValueError: unknown format.
        FileNotFoundError: ``dataset_dir`` does not exist (one sentence naming it).
    """
    if dataset_format not in DATASET_FORMATS:
        raise ValueError(f"Unknown dataset_format {dataset_format!r}; use one of {list(DATASET_FORMATS)}.")
    if str(dataset_dir) == DEMO_DATASET:
        root = make_demo_dataset(demo_dir or "demo_data")
        logger.info("Using the generated demo dataset in %s (not medical data).", root)
        items = msd_datalist(root)
    else:
        root = Path(dataset_dir)
        if not root.is_dir():
            raise FileNotFoundError(
                f"dataset_dir '{root}' does not exist: pass --dataset_dir <folder> (or 'demo' for generated data)."
            )
        if dataset_format == "msd":
            items = msd_datalist(root)
        elif dataset_format == "folders":
            items = folder_datalist(str(root / "images" / "*"), str(root / "labels" / "*"))
        elif dataset_format == "images_2d":
            items = image_folder_datalist(root / "images", root / "masks")
        else:
            items = dicom_datalist(root)
    return items


def dataset_label_names(dataset_dir: str | os.PathLike, demo_dir: str | os.PathLike | None = None) -> dict[int, str]:
    """Label id -> name from the ``dataset.json`` of an MSD-layout ``dataset_dir`` (or the demo); empty otherwise."""
    root = Path(demo_dir or "demo_data") if str(dataset_dir) == DEMO_DATASET else Path(dataset_dir)
    path = root / "dataset.json"
    if not path.is_file():
        return {}
    labels = json.loads(path.read_text()).get("labels", {})
    return {int(k): str(v) for k, v in labels.items() if str(k).isdigit() and int(k) != 0}


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> str | None:
    """The newest ``*checkpoint_epoch=N.pt`` written by the training CheckpointSaver, or None."""
    found = []
    for path in glob.glob(os.path.join(ckpt_dir, "*checkpoint_epoch=*.pt")):
        match = re.search(r"epoch=(\d+)\.pt$", path)
        if match:
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


class RunReport:
    """At the end of training, print the best validation score and where the checkpoints are.

    Args:
        evaluator: the validation evaluator (its ``state.best_metric`` is reported).
        ckpt_dir: the checkpoint folder.
        metric_name: name of the key validation metric.
    """

    def __init__(self, evaluator: Engine | None, ckpt_dir: str, metric_name: str = "val_mean_dice") -> None:
        self.evaluator, self.ckpt_dir, self.metric_name = evaluator, ckpt_dir, metric_name

    def attach(self, engine: Engine) -> None:
        """Print the report when ``engine`` completes."""
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        lines = [f"training finished after epoch {engine.state.epoch}"]
        state = getattr(self.evaluator, "state", None)
        if state is not None and getattr(state, "best_metric_epoch", -1) > 0:
            last = state.metrics.get(self.metric_name)
            lines.append(
                f"validation {self.metric_name}: best {state.best_metric:.4f} (epoch {state.best_metric_epoch}), "
                f"last {last:.4f}"
            )
            extra = {k: v for k, v in state.metrics.items() if k != self.metric_name}
            lines += [f"validation {k}: last {v:.4f}" for k, v in extra.items() if isinstance(v, float)]
        best = os.path.join(self.ckpt_dir, "model.pt")
        lines.append(f"best checkpoint: {os.path.abspath(best) if os.path.exists(best) else 'none (no validation)'}")
        latest = latest_checkpoint(self.ckpt_dir)
        if latest:
            lines.append(f"latest checkpoint (resume with --resume true): {os.path.abspath(latest)}")
        print("\n".join(lines), flush=True)


class TimingReport:
    """At the end of a run, where its time went: waiting for data, the training step, and the handlers.

    Wraps Ignite's :class:`~ignite.handlers.BasicTimeProfiler` and prints one line, e.g. ``time per step (430
    steps): data 4.6 ms, step 46.2 ms; handlers 12.0 s in all (validation included)``. A data time close to the step
    time means the loader is the limit (raise ``num_workers``). On a GPU the step returns once its kernels are
    queued, so work still running is counted where the next host sync happens (the loss logging handler).
    """

    def __init__(self) -> None:
        self.profiler = BasicTimeProfiler()

    def attach(self, engine: Engine) -> None:
        """Profile ``engine`` and print the line when it completes."""
        self.profiler.attach(engine)
        engine.add_event_handler(Events.COMPLETED, self)

    def stats(self) -> dict[str, float]:
        """``steps`` run, mean ``data_ms`` and ``step_ms`` per step, and ``handlers_s`` in all, so far."""
        ran = self.profiler.processing_times > 0  # the iterations this run did (a resumed run skips the first ones)
        steps = int(ran.sum())

        def mean_ms(times: torch.Tensor) -> float:
            return float(times[ran].mean()) * 1000 if steps else 0.0

        handlers = sum(float(times.sum()) for times in self.profiler.event_handlers_times.values())
        return {
            "steps": steps,
            "data_ms": mean_ms(self.profiler.dataflow_times),
            "step_ms": mean_ms(self.profiler.processing_times),
            "handlers_s": handlers,
        }

    def summary(self) -> str:
        """The line, from :meth:`stats`."""
        s = self.stats()
        return (
            f"time per step ({s['steps']} steps): data {s['data_ms']:.1f} ms, step {s['step_ms']:.1f} ms; "
            f"handlers {s['handlers_s']:.1f} s in all (validation included)"
        )

    def __call__(self, engine: Engine) -> None:
        print(self.summary(), flush=True)
