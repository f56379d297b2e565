# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""A batch segmentation job as a careful user running it overnight expects: nothing lost, nothing stale.

:class:`BatchRun` is the job behind ``samparser-infer`` and the bundle's ``inference.json``:

- before any work, :meth:`BatchRun.check` refuses an output folder that cannot be written, that would overwrite an
  input, or that holds results of an earlier run (unless ``overwrite``); nothing is created when it refuses;
- each case is segmented by a :class:`~samparser_monai.engines.volume_inference.VolumeSegmenter`, which never raises
  for a bad case and writes every file under a temporary name first;
- :meth:`BatchRun.finish` writes ``summary.csv`` (every case, its status, the reason for a skip, any warning) and
  ``metrics.csv``, both describing this run only, and says in one line per problem what happened.
"""

from __future__ import annotations

import csv
import glob
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ignite.engine import Engine

from samparser_monai.data.datalists import case_id
from samparser_monai.engines.volume_inference import CaseOutcome, VolumeSegmenter
from samparser_monai.files import staged_file

__all__ = [
    "RUN_FILES",
    "BatchEvaluator",
    "BatchRun",
    "check_output_folder",
    "output_path",
    "qa_files",
    "write_csv_atomic",
]

#: files that describe one run as a whole (rewritten by every run)
RUN_FILES = ("summary.csv", "metrics.csv")


def output_path(output_dir: str | os.PathLike, item: Mapping) -> str:
    """Where the label map of one datalist item goes: ``<output_dir>/<case id of its image>_seg.nii.gz``."""
    return os.path.join(os.fspath(output_dir), f"{case_id(str(item['image']))}_seg.nii.gz")


def write_csv_atomic(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> None:
    """Write ``rows`` to ``path`` through a temporary file in the same folder, renamed into place when complete."""
    with staged_file(path) as partial, open(partial, "x", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def qa_files(output_dir: str | os.PathLike, item: Mapping) -> list[str]:
    """QA pictures of one item in ``<output_dir>/qa`` (``<case>_slice<k>.png``)."""
    name = glob.escape(case_id(str(item["image"])))
    return glob.glob(os.path.join(glob.escape(os.fspath(output_dir)), "qa", f"{name}_slice*.png"))


def check_output_folder(
    output_dir: str | os.PathLike, items: Sequence[Mapping], overwrite: bool = False, flag: str = "--overwrite"
) -> None:
    """Refuse, before any work and creating nothing, an output folder a batch run cannot use safely.

    ``flag`` is how the user turns ``overwrite`` on, named in the sentence (``--overwrite true`` in the bundle).

    Raises:
        ValueError: the folder cannot be written, a label map would overwrite an input, or the folder holds results
            of an earlier run (``summary.csv``, ``metrics.csv``, a label map or QA picture of one of ``items``) and
            ``overwrite`` is off; one sentence with the fix.
    """
    output_dir = os.fspath(output_dir)
    existing = _nearest_existing(output_dir)
    if not os.path.isdir(existing):
        raise ValueError(f"Output folder '{output_dir}' is not writable ('{existing}' is a file).")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"Output folder '{output_dir}' is not writable (no permission to write in '{existing}').")
    sources = {os.path.abspath(str(item[k])) for item in items for k in ("image", "label") if item.get(k)}
    for item in items:
        target = os.path.abspath(output_path(output_dir, item))
        if target in sources:
            raise ValueError(f"Writing '{target}' would overwrite an input; choose another output folder.")
    earlier = [os.path.join(output_dir, name) for name in RUN_FILES]
    earlier += [output_path(output_dir, item) for item in items]
    earlier = sorted(
        {p for p in earlier if os.path.exists(p)} | {p for item in items for p in qa_files(output_dir, item)}
    )
    if earlier and not overwrite:
        names = [os.path.relpath(p, output_dir) for p in earlier]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise ValueError(
            f"Output folder '{output_dir}' already holds results of an earlier run ({shown}); pass {flag} to "
            "replace them, or choose another output folder."
        )


class BatchRun:
    """One batch job over datalist items, with its output folder's safety rules and its summary.

    Args:
        segmenter: segments one item and writes its label map into ``segmenter.output_dir``.
        source: prompt source (see :data:`~samparser_monai.engines.volume_inference.PROMPT_SOURCES`).
        prompts: prompt entries per case id (from :func:`~samparser_monai.engines.load_box_json`), for every
            source but ``label``.
        prompt_file: where ``prompts`` came from (named in warnings and in ``summary.csv``).
        overwrite: replace the results of an earlier run in the output folder. Without it, :meth:`check` refuses a
            folder that holds any file this run would write. With it, a case skipped in this run also loses its
            earlier label map and QA pictures, so that nothing in the folder looks current that is not.
        extra_metrics: columns added to every ``metrics.csv`` row (e.g. the prompt source).
        overwrite_flag: how the user turns ``overwrite`` on, for the sentences (``--overwrite true`` in the bundle).
    """

    def __init__(
        self,
        segmenter: VolumeSegmenter,
        source: str = "label",
        prompts: Mapping[str, Sequence[Mapping]] | None = None,
        prompt_file: str = "",
        overwrite: bool = False,
        extra_metrics: Mapping[str, Any] | None = None,
        overwrite_flag: str = "--overwrite",
    ) -> None:
        self.segmenter, self.source, self.prompts = segmenter, source, dict(prompts or {})
        self.prompt_file, self.overwrite, self.overwrite_flag = prompt_file, overwrite, overwrite_flag
        self.output_dir = segmenter.output_dir
        self.extra_metrics = dict(extra_metrics or {"prompt": source})
        self.outcomes: list[CaseOutcome] = []
        self._targets: dict[str, str] = {}
        self._items: list[Mapping] = []
        self._start = time.perf_counter()

    def _qa_files(self, item: Mapping) -> list[str]:
        return qa_files(self.output_dir, item)

    def check(self, items: Sequence[Mapping]) -> None:
        """Refuse an output folder this run cannot use safely (see :func:`check_output_folder`); keeps ``items``
        for the summary's unmatched-prompt check."""
        check_output_folder(self.output_dir, items, self.overwrite, self.overwrite_flag)
        self._items = list(items)

    def segment(self, item: Mapping) -> CaseOutcome:
        """Segment one item (never raises); a second input with the same case id is skipped, not written over."""
        target = output_path(self.output_dir, item)
        case = str(item.get("case") or case_id(str(item["image"])))
        if target in self._targets:
            outcome = CaseOutcome(
                case=case,
                image=str(item["image"]),
                status="skipped",
                reason=f"input '{self._targets[target]}' of this run has the same case id, and its label map "
                f"'{os.path.basename(target)}' would be overwritten; rename one of them",
            )
        else:
            self._targets[target] = str(item["image"])
            outcome = self.segmenter.segment(item, self.source, self.prompts.get(case))
            if outcome.status != "ok":
                self._remove_stale(item, target, outcome)
        self.outcomes.append(outcome)
        return outcome

    def _remove_stale(self, item: Mapping, target: str, outcome: CaseOutcome) -> None:
        stale = [p for p in (target, *self._qa_files(item)) if os.path.exists(p)]
        if stale and self.overwrite:
            for path in stale:
                os.remove(path)
            outcome.reason += f"; its label map from an earlier run was removed ({self.overwrite_flag})"

    def run(self, items: Iterable[Mapping], progress: bool = True) -> list[CaseOutcome]:
        """Segment every item, with a progress bar; returns the outcomes."""
        from tqdm import tqdm

        items = list(items)
        self._items = self._items or items
        for item in tqdm(items, desc="segmenting", unit="case", disable=not progress):
            self.segment(item)
        return self.outcomes

    def unmatched_prompts(self) -> list[str]:
        """Case ids of the prompt file that match no input of this run."""
        cases = {str(item.get("case") or case_id(str(item["image"]))) for item in self._items}
        cases |= {o.case for o in self.outcomes}
        return sorted(set(self.prompts) - cases)

    def finish(self, fail_on_skip: bool = False) -> int:
        """Write ``summary.csv`` and ``metrics.csv`` (this run only) and print what happened.

        Returns 0 when every case was segmented, 1 when any was skipped. With ``fail_on_skip`` (the bundle), a skip
        raises ``SystemExit`` instead, so that ``python -m monai.bundle run`` exits non-zero with one sentence.
        """
        os.makedirs(self.output_dir, exist_ok=True)
        unmatched = self.unmatched_prompts()
        if unmatched:
            verb = "matches" if len(unmatched) == 1 else "match"
            print(f"warning: {_plural(len(unmatched), 'case id')} in '{self.prompt_file}' {verb} no input: "
                  f"{', '.join(unmatched)}.", file=sys.stderr)  # fmt: skip
        summary = [
            {"case": o.case, "status": o.status, "reason": o.reason, "warning": o.warning, "image": o.image,
             "output": o.output, "slices": o.slices, "seconds": round(o.seconds, 2), "propagation": o.propagation}
            for o in self.outcomes
        ]  # fmt: skip
        summary += [
            {"case": case, "status": "unmatched prompt", "reason": f"'{self.prompt_file}' has prompts for it, but no "
             "input has this case id", "warning": "", "image": "", "output": "", "slices": 0, "seconds": 0.0,
             "propagation": ""}
            for case in unmatched
        ]  # fmt: skip
        write_csv_atomic(os.path.join(self.output_dir, "summary.csv"), summary, list(summary[0]) if summary else [])
        metrics = [{"case": o.case, **row, **self.extra_metrics} for o in self.outcomes for row in o.metrics]
        metrics_path = os.path.join(self.output_dir, "metrics.csv")
        if metrics:
            write_csv_atomic(metrics_path, metrics, list(metrics[0]))
        elif os.path.exists(metrics_path):  # an earlier run's scores must not sit beside this run's label maps
            os.remove(metrics_path)
        return self._report(fail_on_skip)

    def _report(self, fail_on_skip: bool) -> int:
        elapsed = time.perf_counter() - self._start
        done = [o for o in self.outcomes if o.status == "ok"]
        skipped = [o for o in self.outcomes if o.status != "ok"]
        slices = sum(o.slices for o in done)
        print(f"segmented {len(done)} of {len(self.outcomes)} cases, {slices} slices in {elapsed:.1f} s "
              f"({slices / max(elapsed, 1e-9):.2f} slices/s) -> {os.path.abspath(self.output_dir)}")  # fmt: skip
        for o in self.outcomes:
            if o.warning:
                print(f"warning {o.case}: {o.warning}")
        for o in skipped:
            print(f"skipped {o.case}: {o.reason}")
        if skipped and fail_on_skip:
            raise SystemExit(
                f"error: {_plural(len(skipped), 'case')} of {len(self.outcomes)} skipped (the first: "
                f"{skipped[0].case}, {skipped[0].reason}); see {os.path.join(self.output_dir, 'summary.csv')}."
            )
        return 1 if skipped else 0


class BatchEvaluator(Engine):
    """The bundle's ``evaluator`` for a batch job: an ignite engine that runs :class:`BatchRun` over a dataset.

    Each iteration segments one datalist item (the dataset has no transform: the segmenter loads each case itself,
    so an unreadable case is a skip with its reason, not the end of the run). Ignite handlers (progress bar, stats)
    attach as to any engine; ``state.output`` is the case's
    :class:`~samparser_monai.engines.volume_inference.CaseOutcome`.

    Args:
        batch: the job.
        dataset: the datalist items (a MONAI ``Dataset`` without transform, or a list).
        handlers: ignite handlers with an ``attach(engine)`` method.
    """

    def __init__(self, batch: BatchRun, dataset: Iterable[Mapping], handlers: Sequence[Any] = ()) -> None:
        super().__init__(lambda engine, item: batch.segment(item))
        self.batch, self.dataset = batch, dataset
        for handler in handlers:
            handler.attach(self)

    def run(self, data: Iterable | None = None, max_epochs: int = 1, epoch_length: int | None = None) -> Any:
        """Segment every item of ``data`` (default: the dataset) once."""
        items = [self.dataset[i] for i in range(len(self.dataset))] if data is None else list(data)
        return super().run(items, max_epochs=max_epochs, epoch_length=epoch_length)
