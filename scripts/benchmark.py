# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Every fine-tuning method side by side: cost (parameters, checkpoint size, step time, peak memory, inference time)
and accuracy (fine-tuned through the bundle on real data, per-label 3D Dice and HD95 next to the zero-shot model).

Cost half, for each method on one backbone: trainable encoder parameters, trainable parameters in all, the size of
its saved checkpoint (what the bundle writes: only the trained tensors), the training step time and, on CUDA, the
peak memory of a step as ratios to ``decoder_only``, and the inference time of the fine-tuned model (merged where it
can be) as a ratio to the stock model. Variants such as ``full+checkpointing`` or ``parser_encoder+bf16`` add rows
with activation checkpointing of the encoder blocks or bf16/fp16 autocast in the training step.

Accuracy half: every method fine-tuned with ``bundle/configs/train.json`` and its ``configs/methods`` preset on the
training split of the hippocampus data (same budget, seed and box jitter), its checkpoint evaluated with
``evaluate.json`` (label-derived boxes) next to the zero-shot model (see ``samparser_monai.benchmarks.comparison``).

    python scripts/benchmark.py --mode quick                      # both halves, quick budget (a 2-core CPU)
    python scripts/benchmark.py --mode full --output-dir results  # the budget to quote (a GPU)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from samparser_monai.benchmarks.comparison import (
    BUDGETS,
    ZERO_SHOT,
    add_training_prompt_arguments,
    compare_methods,
    training_prompts,
)
from samparser_monai.demo import demo_batch
from samparser_monai.networks import SamParser, coefficient_state, parameter_groups, trainable_summary
from samparser_monai.process import retain_freed_host_memory

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "msd_hippocampus"

#: method -> SamParser arguments (the configs/methods presets).
METHODS: dict[str, dict] = {
    "decoder_only": {"coefficients": None, "trainable": "decoder"},
    "parser_paper": {"coefficients": "paper", "trainable": "parser"},
    "parser_official": {"coefficients": "paper", "trainable": "parser", "form": "official"},
    "parser_encoder": {"coefficients": "encoder", "trainable": "parser"},
    "coefficients_paper": {"coefficients": "paper", "trainable": "coefficients"},
    "coefficients_encoder": {"coefficients": "encoder", "trainable": "coefficients"},
    "lora": {"coefficients": None, "trainable": "lora"},
    "full": {"coefficients": None, "trainable": "full"},
}
#: variant flags: ``method+flag[+flag]`` rows of the cost half.
FLAGS = ("checkpointing", "bf16", "fp16", "official")
#: cost-half defaults per mode: images per step and timed repeats.
COST_DEFAULTS = {
    "quick": {"batch_size": 1, "repeats": 1, "warmup": 1},
    "full": {"batch_size": 2, "repeats": 10, "warmup": 5},
}


def parse_variant(name: str) -> tuple[str, dict, torch.dtype | None]:
    """``"full+checkpointing+bf16"`` -> (method, SamParser arguments, autocast dtype); one sentence on a bad name."""
    method, *flags = name.split("+")
    if method not in METHODS or any(flag not in FLAGS for flag in flags):
        raise ValueError(f"Unknown method or variant {name!r}: use a method of {list(METHODS)}, optionally with "
                         f"'+flag' for flags {list(FLAGS)}.")  # fmt: skip
    kwargs = {**METHODS[method], **({"checkpoint_blocks": True} if "checkpointing" in flags else {})}
    if "official" in flags:  # the original code's factored form at this method's coverage
        kwargs["form"] = "official"
    dtype = torch.bfloat16 if "bf16" in flags else torch.float16 if "fp16" in flags else None
    return method, kwargs, dtype


def _median_time(step: Callable[[], None], repeats: int, device: torch.device, warmup: int = 1) -> float:
    times = []
    for index in range(repeats + warmup):  # the first calls warm up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, args: argparse.Namespace, device: torch.device, stock: SamParser) -> dict:
    """Measure one method or variant; see the module docstring. Inference alternates with the stock model, call by
    call, and the ratio is the median of the per-call ratios (machine load drifts hit both alike)."""
    method, kwargs, dtype = parse_variant(name)
    model = SamParser(args.backbone, args.checkpoint, **kwargs).to(device)
    summary = trainable_summary(model)
    encoder = sum(t for part, (t, _) in summary.items() if part.startswith("image_encoder"))
    buffer = io.BytesIO()
    torch.save(coefficient_state(model), buffer)
    images, masks, boxes = (t.to(device) for t in demo_batch(args.batch_size, model.image_size, seed=1))
    optimizer = torch.optim.AdamW(parameter_groups(model, 1e-5, coefficient_learning_rate=1e-3))
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext

    def train_step() -> None:
        optimizer.zero_grad()
        with autocast():
            loss = F.binary_cross_entropy_with_logits(model(images, boxes).float(), masks)
        loss.backward()
        optimizer.step()

    model.train()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = _median_time(train_step, args.repeats, device, args.warmup)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else math.nan
    model.eval()
    if kwargs.get("form") != "official":  # the original code cannot merge: it runs factored at inference
        model.merge()
    ratios = []
    with torch.no_grad():
        for _ in range(args.repeats):
            ours = _median_time(lambda: model(images, boxes), 1, device)
            reference = _median_time(lambda: stock(images, boxes), 1, device)
            ratios.append(ours / reference)
    return {"method": name, "encoder": encoder, "total": summary["total"][0], "bytes": buffer.tell(),
            "step": step, "peak": peak, "infer": statistics.median(ratios)}  # fmt: skip


def render_cost(rows: list[dict], header: str) -> str:
    """The cost table (Markdown), ratios to decoder_only and to the stock model."""
    base = next(r for r in rows if r["method"] == "decoder_only")
    lines = [header, "", "| method | trainable encoder | trainable total | checkpoint | step / decoder_only | "
             "peak memory / decoder_only | inference / stock |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        memory = (
            "n/a (CPU)" if math.isnan(r["peak"]) else f"{r['peak'] / base['peak']:.2f} ({r['peak'] / 2**30:.2f} GiB)"
        )
        lines.append(
            f"| {r['method']} | {r['encoder']:,} | {r['total']:,} | {r['bytes'] / 1e6:.1f} MB | "
            f"{r['step'] / base['step']:.2f} | {memory} | {r['infer']:.3f} |"
        )
    lines += ["", f"decoder_only step: {base['step'] * 1e3:.0f} ms (median); inference ratios are medians of per-call "
              "ratios, each call of a fine-tuned model followed by one of the stock model."]  # fmt: skip
    return "\n".join(lines) + "\n"


def render_accuracy(rows: list[dict], header: str) -> str:
    """The accuracy table (Markdown): one row per method, Dice mean ± SD and HD95 per label."""
    labels = sorted({(r["label"], r["label_name"]) for r in rows})
    head = "| method | " + " | ".join(f"{name} Dice | {name} HD95 (mm)" for _, name in labels)
    head += " | train s | eval s | step ms | data ms |"
    lines = [header, "", head, "|---|" + "---:|---:|" * len(labels) + "---:|---:|---:|---:|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for label, _ in labels:
            r = next(r for r in rows if r["method"] == method and r["label"] == label)
            empty = f" ({r['empty']} empty)" if r["empty"] else ""
            cells.append(f"{r['dice']:.4f} ± {r['dice_sd']:.4f} | {r['hd95']:.2f}{empty}")
        first = next(r for r in rows if r["method"] == method)
        timing = " | ".join(f"{first[k]:.1f}" if first[k] != "" else "-" for k in ("step_ms", "data_ms"))
        lines.append(
            f"| {method} | " + " | ".join(cells) + f" | {first['train_s']:.0f} | {first['eval_s']:.0f} | {timing} |"
        )
    cases = max(r["cases"] for r in rows)
    lines += ["", f"Dice: mean ± SD over {cases} validation case(s); HD95: mean over cases with a non-empty prediction "
              "(an empty prediction has no finite HD95 and is counted instead). step ms / data ms: mean training step "
              "and wait for the next batch, per step."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_accuracy(rows: list[dict], path: Path) -> Path | None:
    """Bar chart of Dice per method and label (PNG); None where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib).", file=sys.stderr)
        return None
    methods = list(dict.fromkeys(r["method"] for r in rows))
    labels = sorted({(r["label"], r["label_name"]) for r in rows})
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(1.3 * len(methods) + 2, 3.6))
    for i, (label, name) in enumerate(labels):
        picked = [next(r for r in rows if r["method"] == m and r["label"] == label) for m in methods]
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(methods))]
        ax.bar(xs, [r["dice"] for r in picked], width, yerr=[r["dice_sd"] for r in picked], label=name, capsize=2)
    ax.set_xticks(range(len(methods)), methods, rotation=20)
    ax.set_ylabel("3D Dice")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_cost(args: argparse.Namespace, device: torch.device) -> str:
    """The cost half; returns its Markdown table."""
    names = list(dict.fromkeys(["decoder_only", *args.methods, *args.variants]))
    for name in names:
        parse_variant(name)
    stock = SamParser(args.backbone, args.checkpoint, coefficients=None, trainable="decoder").to(device).eval()
    rows = [measure(name, args, device, stock) for name in tqdm(names, desc="cost", unit="method")]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    header = (f"{args.backbone} on {card}, torch {torch.__version__}, batch {args.batch_size}, "
              f"{args.repeats} repeats after {args.warmup} warm-up step(s)")  # fmt: skip
    return render_cost(rows, header)


#: numeric columns of ``accuracy.csv`` and their types (the rest are text).
CSV_TYPES = {"label": int, "cases": int, "dice": float, "dice_sd": float, "hd95": float, "empty": int,
             "train_s": float, "eval_s": float, "step_ms": float, "data_ms": float}  # fmt: skip


def read_accuracy_csv(path: Path) -> list[dict]:
    """The rows of an ``accuracy.csv`` with their numeric columns typed (a blank timing stays ``""``)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [{k: (CSV_TYPES[k](v) if k in CSV_TYPES and v != "" else v) for k, v in row.items()} for row in rows]


def kept_rows(out: Path, settings: dict) -> list[dict]:
    """For ``--resume``: the complete methods' rows of an earlier run into ``out`` with the same settings.

    Raises:
        ValueError: there are rows but their settings differ from this run's, or are not on record.
    """
    csv_path, settings_path = out / "accuracy.csv", out / "accuracy_settings.json"
    if not csv_path.exists():
        return []
    if not settings_path.exists():
        raise ValueError(f"--resume: {settings_path} is missing, so the settings of {csv_path} are unknown: "
                         "run without --resume to start over.")  # fmt: skip
    earlier = json.loads(settings_path.read_text())
    if earlier != settings:
        changed = ", ".join(f"{k} {earlier.get(k)!r} -> {v!r}" for k, v in settings.items() if earlier.get(k) != v)
        raise ValueError(f"--resume: {csv_path} was made with other settings ({changed}): run without --resume "
                         "to start over, or with the same settings.")  # fmt: skip
    rows = read_accuracy_csv(csv_path)
    per_method = {m: [r for r in rows if r["method"] == m] for m in dict.fromkeys(r["method"] for r in rows)}
    labels = max((len(v) for v in per_method.values()), default=0)
    return [r for group in per_method.values() if len(group) == labels for r in group]  # a cut-off method reruns


def run_accuracy(args: argparse.Namespace, device: torch.device, out: Path) -> tuple[str, list[str]]:
    """The accuracy half; writes ``accuracy.csv``, ``accuracy.md`` and ``accuracy.png`` in ``out`` and returns the
    Markdown table and the methods that failed. The table and plot are rewritten after every method, so a stopped
    run never leaves them stale.

    With ``args.resume`` the methods already in ``out/accuracy.csv`` from a run with the same settings are kept and
    only the others run (a run cut off by a time limit goes on where it stopped). A method that fails is one
    sentence on stderr and the others still run.
    """
    if not Path(args.dataset_dir).is_dir():
        raise FileNotFoundError(f"dataset '{args.dataset_dir}' does not exist: pass --dataset-dir <MSD task folder>.")
    given = {"epochs": args.epochs, "samples_per_epoch": args.samples, "batch_size": args.train_batch,
             "val_cases": args.val_cases, "num_workers": args.workers}  # fmt: skip
    budget = dataclasses.replace(BUDGETS[args.mode], **{k: v for k, v in given.items() if v is not None})
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    dataset = Path(args.dataset_dir).resolve().name
    prompts = training_prompts(args, ROOT)
    settings = {"budget": dataclasses.asdict(budget), "backbone": args.backbone, "checkpoint": args.checkpoint,
                "dataset": dataset, "device": card, "torch": torch.__version__,
                "retain_host_memory": not args.release_host_memory, "training_prompts": prompts}  # fmt: skip
    kept = kept_rows(out, settings) if args.resume else []
    (out / "accuracy.csv").unlink(missing_ok=True)
    (out / "accuracy_settings.json").write_text(json.dumps(settings, indent=4) + "\n")
    done = list(dict.fromkeys(r["method"] for r in kept))
    methods = [m for m in [ZERO_SHOT, *[m for m in args.methods if m in METHODS]] if m not in done]
    if kept:
        with open(out / "accuracy.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(kept[0]))
            writer.writeheader()
            writer.writerows(kept)
    extra = {"backbone": args.backbone, "base_checkpoint": args.checkpoint,
             "retain_host_memory": not args.release_host_memory, **prompts}  # fmt: skip
    shares = ", ".join(f"{key} {value:g}" for key, value in prompts.items())
    start = time.perf_counter()
    failed: list[str] = []

    def write_table(*_: object) -> str:
        """Rewrite accuracy.md and accuracy.png from the CSV: never stale, even if the run is stopped."""
        rows = read_accuracy_csv(out / "accuracy.csv") if (out / "accuracy.csv").exists() else []
        if not rows:
            for stale in ("accuracy.md", "accuracy.png"):
                (out / stale).unlink(missing_ok=True)
            return ""
        header = (f"{args.backbone} on {card}, torch {torch.__version__}, mode {args.mode}: {budget.describe()}, "
                  f"{shares}; {(time.perf_counter() - start) / 60:.1f} min in this run")  # fmt: skip
        if done:
            header += f" (resumed: {', '.join(done)} kept from an earlier run with the same settings)"
        missing = [m for m in methods if m not in {r["method"] for r in rows} and m not in failed]
        if missing:
            header += f" (still running: {', '.join(missing)})"
        if failed:
            header += f" (failed: {', '.join(failed)}; rerun with --resume)"
        table = render_accuracy(rows, header)
        (out / "accuracy.md").write_text(table)
        plot_accuracy(rows, out / "accuracy.png")
        return table

    def report_failure(method: str, err: Exception) -> None:
        failed.append(method)
        print(f"{method} failed, skipped: {err}", file=sys.stderr, flush=True)

    write_table()
    if methods:
        compare_methods(methods, args.dataset_dir, out / "runs", budget, ROOT, device=str(device),
                        cache_gb=args.cache_gb, extra=extra, csv_path=out / "accuracy.csv", on_rows=write_table,
                        on_failure=report_failure)  # fmt: skip
    return write_table(), failed


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["all", "cost", "accuracy"], default="all", help="which half (default all)")
    parser.add_argument("--mode", choices=list(BUDGETS), default="quick",
                        help="budget: quick (a 2-core CPU, minutes) or full (the one to quote; a GPU)")  # fmt: skip
    parser.add_argument("--backbone", default="lite_medsam", help="backbone (default lite_medsam)")
    parser.add_argument("--checkpoint", default=None, help="base checkpoint path (ViT backbones)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run")
    parser.add_argument("--variants", nargs="*", default=[], help=f"extra cost rows: method+flag, flags {FLAGS}")
    parser.add_argument("--batch-size", type=int, help="cost half: images per step (quick 1, full 2)")
    parser.add_argument("--repeats", type=int, help="cost half: timed repeats per measurement (quick 1, full 10)")
    parser.add_argument("--warmup", type=int, help="cost half: untimed training steps first (quick 1, full 5)")
    parser.add_argument("--dataset-dir", default=str(DEFAULT_DATA), help="accuracy half: MSD hippocampus folder")
    parser.add_argument("--epochs", type=int, help="accuracy half: override the mode's epochs")
    parser.add_argument("--samples", type=int, help="accuracy half: slices per epoch (0: all)")
    parser.add_argument("--train-batch", type=int, help="accuracy half: slices per training step")
    parser.add_argument("--val-cases", type=int, help="accuracy half: validation cases (0: all)")
    parser.add_argument("--workers", type=int, help="accuracy half: data loader workers")
    parser.add_argument("--cache-gb", type=float, default=4.0, help="accuracy half: shared trunk cache budget")
    parser.add_argument("--resume", action="store_true",
                        help="accuracy half: keep the methods an earlier run into --output-dir finished with the same "
                        "settings and run only the others")  # fmt: skip
    add_training_prompt_arguments(parser)
    parser.add_argument("--release-host-memory", action="store_true",
                        help="leave glibc returning freed host memory to the system between steps (the bundle's "
                        "retain_host_memory false; slower on a CPU, lower peak host memory)")  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--output-dir", default="benchmark_results", help="where tables, CSV, plot and runs go")
    args = parser.parse_args(argv)
    for key, value in COST_DEFAULTS[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out = Path(args.output_dir)
    device = torch.device(args.device)
    retain_freed_host_memory(not args.release_host_memory)  # as the bundle runs do, so the cost half measures alike
    try:
        out.mkdir(parents=True, exist_ok=True)
        if args.part in ("all", "cost"):
            table = run_cost(args, device)
            (out / "cost.md").write_text(table)
            print(table, flush=True)
        if args.part in ("all", "accuracy"):
            table, failed = run_accuracy(args, device, out)
            print(table, flush=True)
            if failed:
                print(f"error: {len(failed)} method(s) failed ({', '.join(failed)}); the table holds the others: rerun "
                      "with --resume.", file=sys.stderr)  # fmt: skip
                return 1
    except (ImportError, ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"results in {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
