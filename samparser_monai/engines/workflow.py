# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Small pieces the bundle configs call: the checkpoint to resume and the reports at the end of a run (the datalists
they read are in :mod:`samparser_monai.data.dataset_dir`)."""

from __future__ import annotations

import glob
import logging
import os
import re

import torch
from ignite.engine import Engine, Events
from ignite.handlers import BasicTimeProfiler

__all__ = ["RunReport", "TimingReport", "latest_checkpoint"]

logger = logging.getLogger(__name__)


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
