# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""3D prompts as users give them, next to oracle boxes: one row per prompt protocol on the dev validation split.

Protocols, per label of each case (simulated from the reference, as a user would give them):

- ``label``: a tight box from the reference on every slice (the oracle evaluation protocol; no user has it);
- ``roi_boxes``: the label's 3D bounding box + 1 voxel, its in-plane box on every slice it spans (the old default);
- ``roi``: the same 3D box through the prompt engine (centre slice, then propagated within the box);
- ``key``: a tight box on the label's largest slice, propagated with the stop rule;
- ``click1``: one positive click at the most interior point of the largest slice, propagated;
- ``click3``: then two corrective clicks, each at the most interior voxel of the largest error region of the
  previous result (positive where the object was missed, negative where it was over-segmented).

Reported per protocol and label: Dice, HD95, false-positive slices (slices with the label predicted and none in the
reference), encoder passes and seconds per case; ``--trace`` also writes what the stop rule saw on every slice
(``trace.csv``), which is what the stop rule's defaults are chosen from, with the final result's Dice and area on
that slice, and those by distance from the start slice (``by_distance.md``: where propagation loses the object).
The simulation is the library's (:mod:`samparser_monai.engines.simulated_prompts`), the same that
``evaluate.json --eval_prompt`` runs.

    python scripts/benchmark_prompts.py --checkpoint bundle/models/model.pt --output-dir prompts --cases 26

The tables are rewritten after every case; ``--resume`` keeps the cases a stopped run finished (same settings, the
checkpoint file unchanged) and runs the others. A case that cannot be read or segmented is one sentence on stderr
and is skipped; the others are reported and the script exits 1. ``--share-embeddings`` encodes each slice once per
case for all protocols: the same masks in about half the time, for accuracy runs (seconds are then not reported).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from samparser_monai.data import bundle_datalists
from samparser_monai.engines.evaluation import case_metrics
from samparser_monai.engines.simulated_prompts import PROTOCOLS, simulate
from samparser_monai.engines.stop_rule import StopRule, add_stop_rule_arguments, stop_rule_from_args
from samparser_monai.errors import root_message
from samparser_monai.networks.artefacts import merged_model
from samparser_monai.networks.runtime import RUNTIMES, runtime_cache_dir, use_runtime
from samparser_monai.process import retain_freed_host_memory
from samparser_monai.transforms.pipelines import volume_transforms

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "msd_hippocampus"
OUTPUTS = ("prompts.csv", "prompts.md", "trace.csv", "by_distance.md")
SETTINGS = "prompts_settings.json"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-dir", default=str(DEFAULT_DATA), help="dev data (MSD layout); its validation split")
    parser.add_argument("--cases", type=int, default=0, help="validation cases (0: all)")
    parser.add_argument(
        "--first-case",
        type=int,
        default=0,
        help="skip this many validation cases first (choose on some, confirm on others)",
    )
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    parser.add_argument("--checkpoint", help="coefficient checkpoint (default: the zero-shot base model)")
    parser.add_argument("--backbone", default="lite_medsam")
    parser.add_argument("--base-checkpoint", help="base SAM checkpoint (ViT backbones)")
    parser.add_argument("--intensity", default="mr")
    parser.add_argument("--axis", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    add_stop_rule_arguments(parser)
    parser.add_argument("--trace", action="store_true", help="write trace.csv: what the stop rule saw per slice")
    parser.add_argument(
        "--share-embeddings",
        action="store_true",
        help="encode each slice once per case for all protocols (same masks, about half the time with three "
        "protocols; encoder passes still count each protocol's slices, seconds are not reported)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runtime", default="torch", choices=RUNTIMES, help="image encoder runtime (default torch)")
    parser.add_argument("--output-dir", default="benchmark_results/prompts")
    parser.add_argument(
        "--resume", action="store_true", help="keep the cases an earlier run with the same settings finished"
    )
    args = parser.parse_args(argv)
    try:
        if not Path(args.dataset_dir).is_dir():
            raise FileNotFoundError(f"dataset '{args.dataset_dir}' does not exist: pass --dataset-dir <folder>.")
        retain_freed_host_memory(True)
        _, cases = bundle_datalists(args.dataset_dir, "msd", 0.2, 0)
        if not 0 <= args.first_case < len(cases):
            raise ValueError(f"--first-case {args.first_case} is outside the {len(cases)} validation cases.")
        cases = cases[args.first_case :]
        cases = cases[: args.cases] if args.cases else cases
        model = merged_model(args.backbone, args.base_checkpoint, args.checkpoint, args.device)
        use_runtime(model, args.runtime, None, runtime_cache_dir(args.checkpoint))
        rule = stop_rule_from_args(args, fine_tuned=bool(args.checkpoint))
        transform = volume_transforms(args.intensity, keys=("image", "label"))
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        settings = run_settings(args, rule, [str(item["case"]) for item in cases])
        rows, traces = kept_results(out, settings) if args.resume else ([], [])
        for name in OUTPUTS:  # an earlier run's tables must never pass for this run's
            (out / name).unlink(missing_ok=True)
        (out / SETTINGS).write_text(json.dumps(settings, indent=4) + "\n")
        kept = {str(r["case"]) for r in rows}
        skipped: list[str] = []
        if rows:
            table = write_outputs(out, rows, traces, len(kept), len(cases), skipped, len(kept))
        todo = [item for item in cases if str(item["case"]) not in kept]
        for done, item in enumerate(tqdm(todo, desc="cases", unit="case"), start=len(kept) + 1):
            try:
                case_rows, case_traces = run_case(item, transform, model, rule, args)
            except Exception as err:  # a bad case is reported and skipped; the benchmark goes on
                skipped.append(str(item["case"]))
                tqdm.write(f"case {item['case']} skipped: {root_message(err)}", file=sys.stderr)
            else:
                rows += case_rows
                traces += case_traces
            if rows:
                table = write_outputs(out, rows, traces if args.trace else [], done, len(cases), skipped, len(kept))
        if not rows:
            raise ValueError(f"every one of the {len(cases)} cases failed: nothing to report.")
        print(table)
        if skipped:
            print(f"error: {len(skipped)} of {len(cases)} cases skipped ({', '.join(skipped)}); the tables hold the "
                  "others: rerun with --resume to retry only them.", file=sys.stderr)  # fmt: skip
    except (ValueError, FileNotFoundError, OSError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"results in {Path(args.output_dir).resolve()}")
    return 1 if skipped else 0


def run_case(
    item: dict, transform: Callable[[dict], dict], model: torch.nn.Module, rule: StopRule, args: argparse.Namespace
) -> tuple[list, list]:
    """One validation case through every protocol of ``args.protocols``: its metric rows (one per protocol and label)
    and its trace rows (what the stop rule saw on every slice, with the final result's scores there)."""
    data = transform(item)
    reference = data["label"][0].long().numpy()
    labels = [int(v) for v in np.unique(reference) if v]
    if not labels:
        raise ValueError("its reference label is empty, so no prompt can be simulated")
    spacing = [float(s) for s in np.sqrt((np.asarray(data["image"].affine)[:3, :3] ** 2).sum(0))]
    others = tuple(a for a in range(3) if a != args.axis)
    present = {lab: set(np.nonzero((reference == lab).any(axis=others))[0].tolist()) for lab in labels}
    voxels = {lab: int((reference == lab).sum()) for lab in labels}  # each trace row's label_voxels
    rows, traces = [], []
    shared: dict[int, torch.Tensor] | None = {} if args.share_embeddings else None
    for protocol in args.protocols:
        start = time.perf_counter()
        run = simulate(protocol, model, data["image"], reference, args.axis, args.batch_size, rule, labels, shared)
        prediction, passes = run.labels.numpy(), run.encoder_passes
        seconds = math.nan if shared is not None else time.perf_counter() - start  # shared: not this protocol's cost
        starts = {row["label"]: row["slice"] for row in run.trace if row["direction"] == 0}
        traces += [
            dict(
                row,
                case=item["case"],
                protocol=protocol,
                in_reference=int(row["slice"] in present[row["label"]]),
                distance=abs(row["slice"] - starts.get(row["label"], row["slice"])),
                **slice_scores(prediction, reference, row["label"], args.axis, row["slice"]),
                label_voxels=voxels[row["label"]],
            )
            for row in run.trace
        ]
        n = max(labels) + 1
        one_hot = [
            torch.nn.functional.one_hot(torch.as_tensor(a), n).permute(3, 0, 1, 2) for a in (prediction, reference)
        ]
        metrics = case_metrics(one_hot[0], one_hot[1], spacing, 1.0)
        for label, metric in zip(range(1, n), metrics):
            predicted, truth = (prediction == label).any(axis=others), (reference == label).any(axis=others)
            rows.append(
                {
                    "case": item["case"],
                    "protocol": protocol,
                    "label": label,
                    "dice": metric["dice"],
                    "hd95": metric["hd95"],
                    "fp_slices": int((predicted & ~truth).sum()),
                    "encoder_passes": passes,
                    "seconds": seconds if math.isnan(seconds) else round(seconds, 2),
                }  # fmt: skip
            )
    return rows, traces


def run_settings(args: argparse.Namespace, rule: StopRule, cases: list[str]) -> dict:
    """Everything a result depends on, as ``--resume`` compares it: the cases, protocols, model (the checkpoint's
    size and modification time too: a checkpoint trained again in place is another model), stop rule and runtime."""
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    stamp = [checkpoint.stat().st_size, checkpoint.stat().st_mtime_ns] if checkpoint and checkpoint.is_file() else None
    return {"dataset_dir": str(Path(args.dataset_dir).resolve()), "cases": cases, "protocols": args.protocols,
            "checkpoint": args.checkpoint, "checkpoint_file": stamp, "backbone": args.backbone,
            "base_checkpoint": args.base_checkpoint, "intensity": args.intensity, "axis": args.axis,
            "batch_size": args.batch_size, "rule": dataclasses.asdict(rule), "trace": args.trace,
            "device": args.device, "runtime": args.runtime, "share_embeddings": args.share_embeddings,
            "torch": torch.__version__}  # fmt: skip


def kept_results(out: Path, settings: dict) -> tuple[list[dict], list[dict]]:
    """For ``--resume``: the metric and trace rows of the cases an earlier run into ``out`` finished with the same
    settings (a case is finished when ``prompts.csv`` holds it: it is written after the case's trace).

    Raises:
        ValueError: there are rows but their settings differ from this run's, or are not on record.
    """
    csv_path, settings_path = out / "prompts.csv", out / SETTINGS
    if not csv_path.exists():
        return [], []
    if not settings_path.exists():
        raise ValueError(f"--resume: {settings_path} is missing, so the settings of {csv_path} are unknown: "
                         "run without --resume to start over.")  # fmt: skip
    earlier = json.loads(settings_path.read_text())
    if earlier != settings:
        changed = ", ".join(k for k in settings if earlier.get(k) != settings[k])
        raise ValueError(f"--resume: {csv_path} was made with other settings ({changed} differ): run without "
                         "--resume to start over, or with the same settings.")  # fmt: skip
    rows = _read_csv(csv_path)
    finished = {str(r["case"]) for r in rows}
    traces = _read_csv(out / "trace.csv") if settings["trace"] and (out / "trace.csv").exists() else []
    return rows, [r for r in traces if str(r["case"]) in finished]


def _read_csv(path: Path) -> list[dict]:
    """A CSV this script wrote, numbers typed again (``case``, ``protocol`` and ``stop`` stay text)."""

    def typed(key: str, value: str) -> object:
        if key in ("case", "protocol", "stop") or value == "":
            return value
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        return value

    with open(path, newline="") as handle:
        return [{k: typed(k, v) for k, v in row.items()} for row in csv.DictReader(handle)]


def write_outputs(
    out: Path, rows: list[dict], traces: list[dict], done: int, total: int, skipped: list[str], resumed: int = 0
) -> str:
    """(Re)write ``trace.csv`` and ``by_distance.md`` (with traces), then ``prompts.csv`` and ``prompts.md`` from the
    cases so far, so that a stopped run leaves tables that say how far it got; returns the Markdown table."""
    for name, records in (("trace.csv", traces), ("prompts.csv", rows)):
        if records:
            with open(out / name, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(records[0]))
                writer.writeheader()
                writer.writerows(records)
    if traces:
        (out / "by_distance.md").write_text(render_by_distance(traces))
    notes = [f"resumed: {resumed} cases kept from an earlier run with the same settings"] if resumed else []
    notes += [f"still running: {done} of {total} cases done"] if done < total else []
    notes += [f"skipped: {', '.join(skipped)}"] if skipped else []
    counted = len({r["case"] for r in rows})
    table = f"{counted} cases" + (f" ({'; '.join(notes)})" if notes else "") + "\n\n" + render(rows)
    (out / "prompts.md").write_text(table)
    return table


def slice_scores(prediction: np.ndarray, reference: np.ndarray, label: int, axis: int, index: int) -> dict:
    """The final result on one slice against the reference: ``slice_dice`` and ``area_ratio`` (predicted over
    reference pixels; NaN where the reference has no ``label`` there), and the pixel counts behind them
    (``predicted_area``, ``reference_area``, ``intersection``): what ``choose_stop_rule.py --score dice`` adds up
    into a rule's volume Dice, with the label's reference voxels in the whole volume (``label_voxels``, per case)."""
    predicted = np.take(prediction, index, axis=axis) == label
    truth = np.take(reference, index, axis=axis) == label
    n_predicted, n_truth, overlap = int(predicted.sum()), int(truth.sum()), int((predicted & truth).sum())
    total = n_predicted + n_truth
    dice = 2.0 * overlap / total if total else 1.0
    ratio = n_predicted / n_truth if n_truth else math.nan
    return {
        "slice_dice": round(dice, 4),
        "area_ratio": round(ratio, 4),
        "predicted_area": n_predicted,
        "reference_area": n_truth,
        "intersection": overlap,
    }


def render_by_distance(traces: list[dict], farthest: int = 6) -> str:
    """Markdown: per protocol and label, the mean slice Dice and the median predicted / reference area by distance
    from the start slice (slices where the reference has the label): where propagation loses the object."""
    lines = ["| protocol | label | measure | " + " | ".join(str(d) for d in range(farthest + 1)) + " |",
             "|---|---:|---|" + "---:|" * (farthest + 1)]  # fmt: skip
    for protocol in dict.fromkeys(r["protocol"] for r in traces):
        for label in sorted({r["label"] for r in traces if r["protocol"] == protocol}):
            rows = [r for r in traces if r["protocol"] == protocol and r["label"] == label and r["in_reference"]]
            at = [[r for r in rows if r["distance"] == d] for d in range(farthest + 1)]
            dice = [f"{statistics.fmean(r['slice_dice'] for r in group):.3f}" if group else "-" for group in at]
            area = [f"{statistics.median(r['area_ratio'] for r in group):.2f}" if group else "-" for group in at]
            lines.append(f"| {protocol} | {label} | Dice | " + " | ".join(dice) + " |")
            lines.append(f"| {protocol} | {label} | predicted / reference area (median) | " + " | ".join(area) + " |")
    return "\n".join(lines) + "\n"


def render(rows: list[dict]) -> str:
    """Markdown: per protocol, Dice and HD95 per label, Dice as a share of the oracle's ("-" without a ``label``
    row), false-positive slices per object, encoder passes and seconds per case ("-": not measured, embeddings
    shared between protocols)."""
    labels = sorted({r["label"] for r in rows})
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))

    def mean(values: Sequence[float]) -> float:
        finite = [v for v in values if not math.isnan(v) and math.isfinite(v)]
        return statistics.fmean(finite) if finite else math.nan

    oracle = {lab: mean([r["dice"] for r in rows if r["protocol"] == "label" and r["label"] == lab]) for lab in labels}
    head = "| protocol | " + " | ".join(f"label {lab} Dice | HD95 | x oracle" for lab in labels)
    lines = [head + " | FP slices / object | encoder passes / case | s / case |",
             "|---|" + "---:|---:|---:|" * len(labels) + "---:|---:|---:|"]  # fmt: skip
    for protocol in protocols:
        picked = [r for r in rows if r["protocol"] == protocol]
        cells = []
        for lab in labels:
            dice = mean([r["dice"] for r in picked if r["label"] == lab])
            hd95 = mean([r["hd95"] for r in picked if r["label"] == lab])
            ratio = f"{dice / oracle[lab]:.2f}" if oracle[lab] == oracle[lab] else "-"  # "-": no label row
            cells.append(f"{dice:.3f} | {hd95:.2f} | {ratio}")
        per_case = {r["case"]: r for r in picked}.values()
        lines.append(
            f"| {protocol} | " + " | ".join(cells) + f" | {mean([r['fp_slices'] for r in picked]):.2f} | "
            f"{mean([r['encoder_passes'] for r in per_case]):.1f} | {_seconds(per_case)} |"
        )
    return "\n".join(lines) + "\n"


def _seconds(per_case) -> str:
    """Mean seconds per case, or "-" where they were not measured (embeddings shared between protocols)."""
    measured = [r["seconds"] for r in per_case if not math.isnan(r["seconds"])]
    return f"{statistics.fmean(measured):.1f}" if measured else "-"


if __name__ == "__main__":
    sys.exit(main())
