# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Training steps and inference forwards on the CPU with glibc returning freed memory to the system, and retaining it.

Each setting runs in its own process (the allocator setting lasts for the process), interleaved, and reports per
step: wall time, minor page faults, kernel (system) CPU time, and the process's peak resident memory. Later steps
are compared (the first ``--warmup`` steps are where a retaining allocator still grows its heap). Results are the
same in both settings: the script checks that the training losses agree exactly.

    python scripts/benchmark_host_memory.py --backbone lite_medsam --steps 6 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from monai.losses import DiceCELoss
from tqdm import tqdm

from samparser_monai.demo import demo_batch
from samparser_monai.engines import retain_freed_host_memory
from samparser_monai.networks import SamParser

SETTINGS = {"release": False, "retain": True}


def _usage() -> tuple[float, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_stime, usage.ru_minflt


def worker(work: str, retain: bool, backbone: str, batch_size: int, steps: int) -> dict:
    """One process's run: ``steps`` training steps (``encoder`` preset) or inference forwards of ``backbone``."""
    applied = retain_freed_host_memory(retain)
    torch.manual_seed(0)
    if work == "train":
        model = SamParser(backbone, coefficients="encoder", trainable="parser").train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        loss_fn = DiceCELoss(sigmoid=True)
    else:
        model = SamParser(backbone, coefficients=None, trainable="decoder").eval()
    images, masks, boxes = demo_batch(batch_size, model.image_size, seed=1)
    rows, losses = [], []
    for _ in range(steps):
        kernel, faults = _usage()
        start = time.perf_counter()
        if work == "train":
            optimizer.zero_grad()
            loss = loss_fn(model(images, boxes), masks)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        else:
            with torch.no_grad():
                model(images, boxes)
        wall = time.perf_counter() - start
        kernel_after, faults_after = _usage()
        rows.append({"wall_s": wall, "faults": faults_after - faults, "kernel_s": kernel_after - kernel})
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    return {"applied": applied, "steps": rows, "losses": losses, "peak_gib": peak_gib}


def _run_worker(work: str, setting: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", work, setting, "--backbone", args.backbone,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--infer-batch-size",
               str(args.infer_batch_size)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {work} run with host memory {setting}d failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict], warmup: int) -> dict:
    """Medians over the steps after ``warmup`` of every run of one work and setting, and the largest peak."""
    later = [step for run in runs for step in run["steps"][warmup:]]
    return {
        "wall_s": statistics.median(s["wall_s"] for s in later),
        "faults": statistics.median(s["faults"] for s in later),
        "kernel_s": statistics.median(s["kernel_s"] for s in later),
        "peak_gib": max(run["peak_gib"] for run in runs),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the comparison (or, with ``--worker``, one side of it); returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="lite_medsam", help="backbone (default lite_medsam)")
    parser.add_argument("--steps", type=int, default=6, help="steps per run (default 6)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of a run left out (default 2)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per work and setting, interleaved (default 1)")
    parser.add_argument("--batch-size", type=int, default=2, help="training slices per step (default 2)")
    parser.add_argument("--infer-batch-size", type=int, default=4, help="inference slices per forward (default 4)")
    parser.add_argument("--worker", nargs=2, metavar=("WORK", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        work, setting = args.worker
        batch = args.batch_size if work == "train" else args.infer_batch_size
        print(json.dumps(worker(work, SETTINGS[setting], args.backbone, batch, args.steps)))
        return 0
    if args.steps <= args.warmup:
        print(f"error: --steps must be more than --warmup ({args.warmup}) to leave steps to compare.", file=sys.stderr)
        return 1
    runs: dict[tuple[str, str], list[dict]] = {}
    order = [(w, s) for _ in range(args.repeats) for w in ("train", "infer") for s in SETTINGS]
    try:
        for work, setting in tqdm(order, desc="runs", unit="run"):
            runs.setdefault((work, setting), []).append(_run_worker(work, setting, args))
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    losses = {s: [run["losses"] for run in runs[("train", s)]] for s in SETTINGS}
    if any(a != losses["release"][0] for a in losses["release"] + losses["retain"]):
        print("error: training losses differ between the settings; the allocator must not change results.",
              file=sys.stderr)  # fmt: skip
        return 1
    applied = all(run["applied"] for run in runs[("train", "retain")])
    print(f"torch {torch.__version__}, {args.backbone}, CPU ({torch.get_num_threads()} threads); training: encoder "
          f"preset, batch {args.batch_size}; inference: batch {args.infer_batch_size}; {args.steps} steps a run, "
          f"medians of steps {args.warmup + 1}-{args.steps} over {args.repeats} run(s); "
          f"setting applied: {applied}")  # fmt: skip
    print("| work | host memory | step s | page faults / step | kernel s / step | peak RSS (GiB) |")
    print("|---|---|---:|---:|---:|---:|")
    for work in ("train", "infer"):
        for setting in SETTINGS:
            row = summarise(runs[(work, setting)], args.warmup)
            print(f"| {work} | {setting} | {row['wall_s']:.2f} | {row['faults']:,.0f} | {row['kernel_s']:.2f} | "
                  f"{row['peak_gib']:.2f} |")  # fmt: skip
    print(f"training losses identical in both settings: {losses['release'][0][-1]:.6f} at the last step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
