# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""3D prompts as users give them, next to oracle boxes: one row per prompt protocol on the dev validation split.

Protocols, per label of each case (simulated from the reference, as a user would give them):

- ``oracle``: a tight box from the reference on every slice (the evaluation protocol; no user has it);
- ``roi_boxes``: the label's 3D bounding box + 1 voxel, its in-plane box on every slice it spans (the old default);
- ``roi``: the same 3D box through the prompt engine (centre slice, then propagated within the box);
- ``key``: a tight box on the label's largest slice, propagated with the stop rule;
- ``click1``: one positive click at the most interior point of the largest slice, propagated;
- ``click3``: then two corrective clicks, each at the most interior voxel of the largest error region of the
  previous result (positive where the object was missed, negative where it was over-segmented).

Reported per protocol and label: Dice, HD95, false-positive slices (slices with the label predicted and none in the
reference), encoder passes and seconds per case; ``--trace`` also writes what the stop rule saw on every slice
(``trace.csv``), which is what the stop rule's defaults are chosen from.

    python scripts/benchmark_prompts.py --checkpoint bundle/models/model.pt --output-dir prompts --cases 26
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from samparser_monai.engines.evaluation import case_metrics
from samparser_monai.engines.host_memory import retain_freed_host_memory
from samparser_monai.engines.prompt_engine import ObjectPrompt, PromptEngine, StopRule
from samparser_monai.engines.slice_inference import label_box_prompts, predict_volume
from samparser_monai.engines.workflow import bundle_datalists
from samparser_monai.export import merged_model
from samparser_monai.transforms.pipelines import volume_transforms
from samparser_monai.transforms.prompts import mask_to_box

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "msd_hippocampus"
PROTOCOLS = ("oracle", "roi_boxes", "roi", "key", "click1", "click3")


def interior_point(mask: np.ndarray) -> tuple[int, ...]:
    """The voxel of ``mask`` farthest from its border (ties: the first in index order)."""
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[tuple(slice(1, -1) for _ in mask.shape)]
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(distance)), mask.shape))


def _roi(reference: np.ndarray, axis: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The 3D bounding box + 1 voxel: in-plane box (x0, y0, x1, y1) and z-range."""
    coords = np.nonzero(reference)
    low = [max(int(c.min()) - 1, 0) for c in coords]
    high = [min(int(c.max()) + 1, n - 1) for c, n in zip(coords, reference.shape)]
    rows, cols = [a for a in range(3) if a != axis]
    box = torch.tensor([low[cols], low[rows], high[cols], high[rows]], dtype=torch.float32)
    return box, (low[axis], high[axis])


def _largest_slice(reference: np.ndarray, axis: int) -> int:
    return int(np.argmax(reference.sum(axis=tuple(a for a in range(3) if a != axis))))


def _click(point: Sequence[int], axis: int) -> list[float]:
    """(x, y, slice) of a voxel index."""
    rows, cols = [a for a in range(3) if a != axis]
    return [float(point[cols]), float(point[rows]), float(point[axis])]


def _corrective_click(prediction: np.ndarray, reference: np.ndarray, axis: int) -> tuple[list[float], int] | None:
    """A click at the most interior voxel of the largest error region: positive in a miss, negative in a leak."""
    error = prediction != reference
    if not error.any():
        return None
    regions, count = ndimage.label(error)
    sizes = ndimage.sum(error, regions, range(1, count + 1))
    region = regions == int(np.argmax(sizes)) + 1
    point = interior_point(region)
    return _click(point, axis), int(reference[point])


def objects_for(protocol: str, reference: np.ndarray, label: int, axis: int, clicks=None) -> ObjectPrompt:
    """The engine prompt of one label under ``protocol`` (``clicks``: the clicks so far, for ``click3``)."""
    mask = reference == label
    key = _largest_slice(mask, axis)
    if protocol == "roi":
        box, z_range = _roi(mask, axis)
        return ObjectPrompt(label, (z_range[0] + z_range[1]) // 2, box, z_range=z_range, clip=box)
    if protocol == "key":
        return ObjectPrompt(label, key, mask_to_box(np.take(mask, key, axis=axis)))
    points, point_labels = clicks
    return ObjectPrompt(label, key, None, torch.tensor(points), torch.tensor(point_labels, dtype=torch.float32))


def run_case(protocol, model, engine, image, reference, axis, labels, batch_size):
    """Prediction, encoder passes and the engine's trace rows of one case under one protocol."""
    if protocol == "oracle":
        prompts = label_box_prompts(torch.as_tensor(reference), axis, labels)
        return predict_volume(model, image, prompts, axis, batch_size).numpy(), len(prompts), []
    if protocol == "roi_boxes":
        prompts: dict[int, list] = {}
        for label in labels:
            box, (z0, z1) = _roi(reference == label, axis)
            for s in range(z0, z1 + 1):
                prompts.setdefault(s, []).append((label, box))
        return predict_volume(model, image, prompts, axis, batch_size).numpy(), len(prompts), []
    clicks = {}
    for label in labels:
        mask = reference == label
        key = _largest_slice(mask, axis)
        point = list(interior_point(np.take(mask, key, axis=axis)))
        point.insert(axis, key)
        clicks[label] = ([_click(point, axis)], [1.0])
    rounds = 3 if protocol == "click3" else 1
    passes, trace, embeddings = 0, [], {}  # later clicks reuse the slices already encoded, as an annotation app would
    for round_ in range(rounds):
        objects = [objects_for(protocol, reference, label, axis, clicks.get(label)) for label in labels]
        result = engine.segment(image, objects, embeddings)
        passes += len(result.encoded)
        trace = [dict(row, label=obj.label) for obj, rows in zip(objects, result.trace) for row in rows]
        prediction = result.labels.numpy()
        if round_ + 1 < rounds:
            for label in labels:
                correction = _corrective_click(prediction == label, reference == label, axis)
                if correction is not None:
                    clicks[label][0].append(correction[0])
                    clicks[label][1].append(float(correction[1] == label))
    return prediction, passes, trace


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-dir", default=str(DEFAULT_DATA), help="dev data (MSD layout); its validation split")
    parser.add_argument("--cases", type=int, default=0, help="validation cases (0: all)")
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    parser.add_argument("--checkpoint", help="coefficient checkpoint (default: the zero-shot base model)")
    parser.add_argument("--backbone", default="lite_medsam")
    parser.add_argument("--base-checkpoint", help="base SAM checkpoint (ViT backbones)")
    parser.add_argument("--intensity", default="mr")
    parser.add_argument("--axis", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    rule = StopRule()
    parser.add_argument("--stop-area", type=float, default=rule.min_area_fraction)
    parser.add_argument("--stop-iou", type=float, default=rule.min_iou)
    parser.add_argument("--stop-overlap", type=float, default=rule.min_overlap)
    parser.add_argument("--max-distance", type=int, default=rule.max_distance)
    parser.add_argument("--trace", action="store_true", help="write trace.csv: what the stop rule saw per slice")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output-dir", default="benchmark_results/prompts")
    args = parser.parse_args(argv)
    try:
        if not Path(args.dataset_dir).is_dir():
            raise FileNotFoundError(f"dataset '{args.dataset_dir}' does not exist: pass --dataset-dir <folder>.")
        retain_freed_host_memory(True)
        _, cases = bundle_datalists(args.dataset_dir, "msd", 0.2, 0)
        cases = cases[: args.cases] if args.cases else cases
        model = merged_model(args.backbone, args.base_checkpoint, args.checkpoint, args.device)
        engine = PromptEngine(
            model,
            args.axis,
            args.batch_size,
            StopRule(args.stop_area, args.stop_iou, args.stop_overlap, args.max_distance),
        )
        transform = volume_transforms(args.intensity, keys=("image", "label"))
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        rows, traces = [], []
        for item in tqdm(cases, desc="cases", unit="case"):
            data = transform(item)
            reference = data["label"][0].long().numpy()
            labels = [int(v) for v in np.unique(reference) if v]
            spacing = [float(s) for s in np.sqrt((np.asarray(data["image"].affine)[:3, :3] ** 2).sum(0))]
            for protocol in args.protocols:
                start = time.perf_counter()
                prediction, passes, trace = run_case(
                    protocol, model, engine, data["image"], reference, args.axis, labels, args.batch_size
                )
                seconds = time.perf_counter() - start
                traces += [dict(row, case=item["case"], protocol=protocol) for row in trace]
                n = max(labels) + 1
                one_hot = [
                    torch.nn.functional.one_hot(torch.as_tensor(a), n).permute(3, 0, 1, 2)
                    for a in (prediction, reference)
                ]
                metrics = case_metrics(one_hot[0], one_hot[1], spacing, 1.0)
                others = tuple(a for a in range(3) if a != args.axis)
                for label, metric in zip(range(1, n), metrics):
                    predicted, present = (prediction == label).any(axis=others), (reference == label).any(axis=others)
                    rows.append(
                        {
                            "case": item["case"],
                            "protocol": protocol,
                            "label": label,
                            "dice": metric["dice"],
                            "hd95": metric["hd95"],
                            "fp_slices": int((predicted & ~present).sum()),
                            "encoder_passes": passes,
                            "seconds": round(seconds, 2),
                        }  # fmt: skip
                    )
        with open(out / "prompts.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        if args.trace and traces:
            with open(out / "trace.csv", "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(traces[0]))
                writer.writeheader()
                writer.writerows(traces)
        table = render(rows)
        (out / "prompts.md").write_text(table)
        print(table)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"results in {Path(args.output_dir).resolve()}")
    return 0


def render(rows: list[dict]) -> str:
    """Markdown: per protocol, Dice and HD95 per label, Dice as a share of the oracle's, false-positive slices per
    object, encoder passes and seconds per case."""
    labels = sorted({r["label"] for r in rows})
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))

    def mean(values):
        finite = [v for v in values if not math.isnan(v) and math.isfinite(v)]
        return statistics.fmean(finite) if finite else math.nan

    oracle = {lab: mean([r["dice"] for r in rows if r["protocol"] == "oracle" and r["label"] == lab]) for lab in labels}
    head = "| protocol | " + " | ".join(f"label {lab} Dice | HD95 | x oracle" for lab in labels)
    lines = [head + " | FP slices / object | encoder passes / case | s / case |",
             "|---|" + "---:|---:|---:|" * len(labels) + "---:|---:|---:|"]  # fmt: skip
    for protocol in protocols:
        picked = [r for r in rows if r["protocol"] == protocol]
        cells = []
        for lab in labels:
            dice = mean([r["dice"] for r in picked if r["label"] == lab])
            hd95 = mean([r["hd95"] for r in picked if r["label"] == lab])
            ratio = dice / oracle[lab] if lab in oracle and oracle[lab] == oracle[lab] else math.nan
            cells.append(f"{dice:.3f} | {hd95:.2f} | {ratio:.2f}")
        per_case = {r["case"]: r for r in picked}.values()
        lines.append(
            f"| {protocol} | " + " | ".join(cells) + f" | {mean([r['fp_slices'] for r in picked]):.2f} | "
            f"{mean([r['encoder_passes'] for r in per_case]):.1f} | {mean([r['seconds'] for r in per_case]):.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
