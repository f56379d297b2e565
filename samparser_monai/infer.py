# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""``samparser-infer``: segment a folder of NIfTI volumes or DICOM series with box prompts.

Label maps are written in each input's exact geometry (shape, affine, spacing, origin) as <case>_seg.nii.gz, with a
summary.csv (every case, its status and the reason for any skip), a metrics.csv (Dice, surface Dice, HD95 per case
and label, when a reference label map exists) and optional QA pictures. The run exits non-zero if any case was
skipped.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path

import torch

from samparser_monai.data.datalists import case_id, msd_datalist
from samparser_monai.engines.batch import BatchRun, check_output_folder
from samparser_monai.engines.prompt_files import load_box_json
from samparser_monai.engines.qa import QAWriter
from samparser_monai.engines.stop_rule import add_stop_rule_arguments, stop_rule_from_args
from samparser_monai.engines.volume_inference import PROMPT_SOURCES, VolumeSegmenter
from samparser_monai.networks.artefacts import merged_model
from samparser_monai.networks.runtime import RUNTIMES, runtime_cache_dir, use_runtime
from samparser_monai.process import retain_freed_host_memory

__all__ = ["collect_inputs", "main"]

_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")
_DICOM_FILE = (
    "'{path}' is a file, but --dicom reads folders of DICOM series: pass the series folder (or leave --dicom out "
    "for NIfTI, NRRD or MHA files)"
)


def collect_inputs(inputs: list[str], labels: str | None = None, dicom: bool = False) -> list[dict]:
    """Datalist items from folders, globs, a datalist JSON (MSD ``dataset.json`` or a list of dicts) or files.

    With ``dicom``, every folder that holds DICOM files is one series (one case). Reference label maps come from the
    datalist, or from ``labels`` (a folder or glob, paired by case id, ``<case>.nii.gz`` or ``<case>_seg.nii.gz``).
    """
    items: list[dict] = []
    for entry in inputs:
        path = Path(entry)
        if path.is_file() and path.suffix == ".json":
            if path.name == "dataset.json":
                items += msd_datalist(path.parent)
            else:
                items += [dict(d) for d in json.loads(path.read_text())]
        elif dicom and path.is_file():
            items.append({"image": entry, "case": case_id(entry), "error": _DICOM_FILE.format(path=entry)})
        elif dicom and path.is_dir():
            series = sorted({p.parent for p in path.rglob("*") if p.is_file() and p.suffix.lower() in ("", ".dcm")})
            items += [{"image": str(s), "case": s.name} for s in series]
        elif path.is_dir():
            items += [{"image": str(p)} for p in sorted(path.iterdir()) if p.name.lower().endswith(_VOLUME_SUFFIXES)]
        else:
            matches = sorted(glob.glob(entry))
            items += [{"image": p} for p in matches] if matches else [{"image": entry}]  # a missing file is reported
    if labels:
        pattern = os.path.join(labels, "*") if os.path.isdir(labels) else labels
        by_case = {}
        for p in sorted(glob.glob(pattern)):
            cid = case_id(p)
            by_case[cid[:-4] if cid.endswith("_seg") else cid] = p
        for item in items:
            item.setdefault("label", by_case.get(str(item.get("case") or case_id(item["image"]))))
    for item in items:
        item.setdefault("case", case_id(item["image"]))
    return items


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="samparser-infer", description=__doc__.split("\n\n")[1])
    parser.add_argument("inputs", nargs="+", help="NIfTI files, folders, globs, a dataset.json, or DICOM folders")
    parser.add_argument("--output-dir", required=True, help="where label maps and CSV files go")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of an earlier run in --output-dir (without it, a folder holding any file this run "
        "would write is refused before any work)",
    )
    parser.add_argument(
        "--prompt",
        choices=PROMPT_SOURCES,
        default="label",
        help="prompt source (default: label): label = oracle boxes from --labels on every slice; from --boxes: roi "
        "(3D box, propagated within it), key (box on one slice, propagated; 'propagate' is its old name), points "
        "(clicks), boxes (each 3D box on every slice it spans)",
    )
    parser.add_argument("--boxes", help="prompt JSON for every source but label (voxel or world mm, per case)")
    add_stop_rule_arguments(parser)
    parser.add_argument("--labels", help="reference label maps (folder or glob), paired by case id")
    parser.add_argument("--dicom", action="store_true", help="inputs are folders of DICOM series")
    parser.add_argument("--checkpoint", help="SAM-PARSER coefficient checkpoint (default: the base model, zero-shot)")
    parser.add_argument("--backbone", default="lite_medsam", help="backbone name (default: lite_medsam)")
    parser.add_argument("--base-checkpoint", help="base SAM checkpoint path (ViT backbones)")
    parser.add_argument(
        "--intensity", default="mr", help="intensity preset: mr, ct_abdomen, ct_liver, ... (default mr)"
    )
    parser.add_argument("--axis", type=int, default=2, help="slicing axis of the RAS-oriented volume (default 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per encoder pass (default 8)")
    parser.add_argument("--jitter", type=float, default=0.0, help="box jitter for --prompt label (fraction of box)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the jitter")
    parser.add_argument("--qa", type=int, default=0, help="QA pictures per case (default 0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="torch",
        help="image encoder runtime. torch (default): PyTorch prepared for inference (batch norms folded, "
        "channels-last, one slice at a time on the CPU); onnxruntime: the encoder exported once per checkpoint next "
        "to it, the fastest on a 2-core CPU with the same masks (the cpu extra); torch-bf16: bfloat16, for CPUs with "
        "native bfloat16 (masks differ slightly); eager: the network as built (the reference). Measured in "
        "docs/benchmarks.md",
    )
    parser.add_argument("--threads", type=int, default=0, help="intra-op CPU threads (default 0: every core)")
    parser.add_argument("--release-host-memory", action="store_true",
                        help="return freed host memory to the system between batches (lower peak host memory; a "
                        "CPU forward about half as fast)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run batch inference; returns 0 when every case was segmented, 1 when any was skipped or the run failed."""
    args = _parse(argv)
    retain_freed_host_memory(not args.release_host_memory)
    items = collect_inputs(args.inputs, args.labels, args.dicom)
    if not items:
        print("error: no input volume found.", file=sys.stderr)
        return 1
    if args.prompt != "label" and not args.boxes:
        print(f"error: --prompt {args.prompt} needs --boxes <file.json>.", file=sys.stderr)
        return 1
    try:  # every check that can fail before the first case runs here, and nothing is written until they pass
        check_output_folder(args.output_dir, items, args.overwrite)
        boxes = load_box_json(args.boxes) if args.prompt != "label" else {}
        model = merged_model(args.backbone, args.base_checkpoint, args.checkpoint or None, args.device)
        use_runtime(model, args.runtime, args.threads, runtime_cache_dir(args.checkpoint))
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    reader = None
    if args.dicom:
        from samparser_monai.data.dicom import DicomSeriesReader

        reader = DicomSeriesReader()
    qa = QAWriter(os.path.join(args.output_dir, "qa"), args.qa, args.axis) if args.qa else None
    segmenter = VolumeSegmenter(
        model,
        args.output_dir,
        args.intensity,
        args.axis,
        args.batch_size,
        args.jitter,
        args.seed,
        reader,
        qa_writer=qa,
        rule=stop_rule_from_args(args, fine_tuned=bool(args.checkpoint)),
    )
    batch = BatchRun(
        segmenter,
        args.prompt,
        boxes,
        prompt_file=args.boxes or "",
        overwrite=args.overwrite,
        extra_metrics={"prompt": args.prompt, "jitter": args.jitter},
    )
    batch.run(items)  # the output folder was checked above, before the model was loaded
    return batch.finish()


if __name__ == "__main__":
    sys.exit(main())
