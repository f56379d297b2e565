# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Inference runtimes side by side, in one run: seconds per encoded slice, per 3D case and per MONAI Label request.

For each runtime (``eager``: PyTorch eager fp32 as built, the reference and the default until this runtime choice;
``torch``: PyTorch prepared for inference, the default; ``onnxruntime``: the merged image encoder exported to ONNX),
on the dev hippocampus validation cases (never held-out data) and the 512 x 512 DICOM CT of the shared data:

- ``encoder``: seconds per slice of ``model.encode`` on 8 real slices in one call (samparser-infer's batch);
- ``encoder_single``: the same slices one call each (a MONAI Label request, or ``--batch-size 1``);
- ``case``: seconds per 3D case with label prompts through :class:`~samparser_monai.engines.VolumeSegmenter`, as
  ``samparser-infer`` runs it, with the Dice against the reference and the agreement (Dice) with torch's label map;
- ``label_first`` / ``label_second``: a MONAI Label request in-process (the app's infer task): an ROI on an image
  not seen before, then the same ROI with a corrective click, as a client refines a result (the embeddings of the
  first are cached).

The runtimes alternate inside every measurement, so another job on the machine slows them alike; the ratios are what
to read. Writes ``runtimes.csv`` (one row per measurement) and ``runtimes.md`` (the table, with the core count).

    python scripts/benchmark_runtimes.py --cases 4 --output-dir benchmark_results/runtimes
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from samparser_monai.data.dicom import DicomSeriesReader
from samparser_monai.data.dicom_datalist import dicom_datalist
from samparser_monai.engines import VolumeSegmenter, bundle_datalists
from samparser_monai.networks.artefacts import merged_model
from samparser_monai.networks.runtime import RUNTIMES, set_threads, use_runtime
from samparser_monai.process import retain_freed_host_memory

try:  # the MONAI Label rows need the label extra; imported now, so a long run cannot fail at its end
    from samparser_monai.label.config import LabelConfig
    from samparser_monai.label.infer import SamParserInferTask
    from samparser_monai.label.model import LiveModel
except ImportError:  # pragma: no cover - depends on the environment
    LabelConfig = None

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def _planes(image_path: str, count: int = 8) -> torch.Tensor:
    """``count`` axial slices of a volume, min-max normalised, as ``count x 1 x H x W``."""
    volume = np.asarray(nib.load(image_path).dataobj, np.float32)
    volume = (volume - volume.min()) / max(float(volume.max() - volume.min()), 1e-6)
    picks = np.linspace(0, volume.shape[2] - 1, count).round().astype(int)
    return torch.from_numpy(np.stack([volume[:, :, k] for k in picks]))[:, None]


def time_encoder(models: dict, planes: torch.Tensor, rounds: int) -> list[dict]:
    """Seconds per slice of each runtime's ``encode``, the slices in one call (``encoder``) and one call each
    (``encoder_single``): the best of ``rounds``, runtimes alternating."""
    rows = []
    for measure, calls in (("encoder", [planes]), ("encoder_single", [p[None] for p in planes])):
        seconds = {name: [] for name in models}
        with torch.inference_mode():
            for model in models.values():  # warm-up: first-call allocations and graph optimisation
                model.encode(calls[0])
            for _ in range(rounds):
                for name, model in models.items():
                    start = time.perf_counter()
                    for call in calls:
                        model.encode(call)
                    seconds[name].append((time.perf_counter() - start) / len(planes))
        rows += [{"measure": measure, "runtime": n, "seconds": min(s), "detail": f"{len(planes)} slices"}
                 for n, s in seconds.items()]  # fmt: skip
    return rows


def time_cases(
    models: dict, items: list[dict], label_format: str, intensity: str, reader: DicomSeriesReader | None = None
) -> list[dict]:
    """Seconds per 3D case with label prompts, Dice against the reference, agreement with the first runtime."""
    rows = []
    for item in tqdm(items, desc="cases", unit="case"):
        maps = {}
        for name, model in models.items():
            with tempfile.TemporaryDirectory() as out:
                segmenter = VolumeSegmenter(model, out, intensity, 2, 8, reader=reader, label_format=label_format)
                outcome = segmenter.segment(item, "label")
                if outcome.status != "ok":
                    raise RuntimeError(f"{item['case']} with {name}: {outcome.reason}")
                maps[name] = np.asarray(nib.load(outcome.output).dataobj)
            dice = statistics.fmean(m["dice"] for m in outcome.metrics)
            first = next(iter(maps.values()))
            agreement = statistics.fmean(
                _dice(maps[name] == c, first == c) for c in np.unique(first) if c != 0
            )  # fmt: skip
            rows.append({"measure": "case", "runtime": name, "seconds": outcome.seconds, "dice": dice,
                         "agreement": agreement, "slices": outcome.slices, "detail": str(item["case"])})  # fmt: skip
    return rows


def time_label_requests(runtimes: list[str], image: str, threads: int) -> list[dict]:
    """A first request (ROI) and a second prompt (a click) on the same image, through the app's infer task."""
    reference = np.asarray(nib.load(image.replace("imagesTr", "labelsTr")).dataobj) > 0
    idx = np.argwhere(reference)
    lo, hi = idx.min(0), idx.max(0)
    roi = [int(lo[0]) - 1, int(hi[0]) + 2, int(lo[1]) - 1, int(hi[1]) + 2, int(lo[2]), int(hi[2]) + 1]
    largest = int(reference.sum(axis=(0, 1)).argmax())
    on_slice = np.argwhere(reference[:, :, largest])
    i, j = on_slice[np.argmin(((on_slice - on_slice.mean(axis=0)) ** 2).sum(axis=1))]
    rows = []
    for name in runtimes:
        config = LabelConfig(runtime=name, threads=threads, device="cpu")
        task = SamParserInferTask(LiveModel(config, lambda: None), config)
        task.model.current()  # load (and export once) before timing: the server does it at its first request
        for measure, request in (
            ("label_first", {"image": image, "roi": roi}),
            ("label_second", {"image": image, "roi": roi, "foreground": [[int(i), int(j), largest]]}),
        ):
            start = time.perf_counter()
            result, params = task(dict(request))
            seconds = time.perf_counter() - start
            mask = np.asarray(nib.load(result).dataobj) > 0
            os.remove(result)
            rows.append({"measure": measure, "runtime": name, "seconds": seconds, "dice": _dice(mask, reference),
                         "slices": params["encoded_slices"],
                         "detail": f"{params['cached_slices']} cached slices"})  # fmt: skip
    return rows


def write_table(rows: list[dict], runtimes: list[str], path: Path) -> str:
    """The Markdown table: mean seconds per measure and runtime, the speed-up against the first runtime."""
    base = runtimes[0]
    lines = [f"Cores: {_cores()}, torch {torch.__version__}, threads {torch.get_num_threads()}", ""]
    header = ["measure", *(f"{r} s" for r in runtimes), *(f"{r} speed-up" for r in runtimes[1:])]
    header += ["Dice (per runtime)", f"agreement with {base}"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---" * len(header) + "|")
    for measure in ("encoder", "encoder_single", "case", "case_ct", "label_first", "label_second"):
        chosen = [r for r in rows if r["measure"] == measure]
        if not chosen:
            continue
        mean = {n: statistics.fmean(r["seconds"] for r in chosen if r["runtime"] == n) for n in runtimes}
        dice = {n: [r["dice"] for r in chosen if r["runtime"] == n and r.get("dice") is not None] for n in runtimes}
        agree = [r["agreement"] for r in chosen if r.get("agreement") is not None and r["runtime"] != base]
        lines.append(
            f"| {measure} ({sum(r['runtime'] == base for r in chosen)}) | "
            + " | ".join(f"{mean[n]:.3f}" for n in runtimes) + " | "
            + " | ".join(f"{mean[base] / mean[n]:.2f}x" for n in runtimes[1:]) + " | "
            + " / ".join(f"{statistics.fmean(d):.4f}" if d else "-" for d in dice.values()) + " | "
            + (f"{min(agree):.4f} (min)" if agree else "-") + " |"
        )  # fmt: skip
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 on success, 1 when the data is missing."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtimes", nargs="+", default=["eager", "torch", "onnxruntime"], choices=RUNTIMES,
                        help="runtimes side by side; the first is the reference of the speed-ups and the agreement "
                        "(default: eager torch onnxruntime)")  # fmt: skip
    parser.add_argument("--dataset-dir", default=str(SHARED / "msd_hippocampus"), help="dev data (MSD layout)")
    parser.add_argument("--cases", type=int, default=4, help="validation cases timed (default 4)")
    parser.add_argument("--ct-dir", default=str(SHARED / "dcmqi_ct3slice_liver_seg"), help="DICOM CT with a SEG")
    parser.add_argument("--rounds", type=int, default=3, help="encoder timing rounds (the best counts)")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (default 0: every core)")
    parser.add_argument("--output-dir", default="benchmark_results/runtimes")
    args = parser.parse_args(argv)
    if not Path(args.dataset_dir).is_dir():
        print(f"error: dev data not found at '{args.dataset_dir}'; pass --dataset-dir.", file=sys.stderr)
        return 1
    retain_freed_host_memory(True)
    threads = set_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = {
        name: use_runtime(merged_model("lite_medsam").eval(), name, threads, out / "runtime_cache")
        for name in args.runtimes
    }
    validation = bundle_datalists(args.dataset_dir, "msd", 0.2, 0)[1][: args.cases]
    rows = time_encoder(models, _planes(validation[0]["image"]), args.rounds)
    rows += time_cases(models, validation, "image", "mr")
    if Path(args.ct_dir).is_dir():
        ct_rows = time_cases(models, dicom_datalist(args.ct_dir), "dicom_seg", "ct_abdomen", DicomSeriesReader())
        rows += [{**r, "measure": "case_ct"} for r in ct_rows]
    if LabelConfig is not None:
        rows += time_label_requests(args.runtimes, validation[0]["image"], threads)
    fields = ["measure", "runtime", "seconds", "dice", "agreement", "slices", "detail"]
    with open(out / "runtimes.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(write_table(rows, args.runtimes, out / "runtimes.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
