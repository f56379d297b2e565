# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Cost of every fine-tuning method on one backbone, measured in the same run (the resource half of the benchmark).

For each method: trainable encoder parameters, trainable parameters in all, the size of its saved checkpoint (what
the bundle writes: only the trained tensors), the training step time and, on CUDA, the peak memory of a step as
ratios to ``decoder_only``, and the inference time of the fine-tuned model (merged where it can be) as a ratio to the
stock model. The accuracy half (fine-tuning every method on the hippocampus data) is not part of this script yet.

    python scripts/benchmark.py --backbone lite_medsam --output docs/benchmark_methods.md
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from samparser_monai.demo import demo_batch
from samparser_monai.networks import SamParser, coefficient_state, trainable_summary

#: method -> SamParser arguments (the configs/methods presets).
METHODS: dict[str, dict] = {
    "decoder_only": {"coefficients": None, "trainable": "decoder"},
    "parser_paper": {"coefficients": "paper", "trainable": "parser"},
    "parser_official": {"coefficients": "paper", "trainable": "parser", "form": "official"},
    "parser_encoder": {"coefficients": "encoder", "trainable": "parser"},
    "lora": {"coefficients": None, "trainable": "lora"},
    "full": {"coefficients": None, "trainable": "full"},
}


def _median_time(step: Callable[[], None], repeats: int, device: torch.device) -> float:
    times = []
    for index in range(repeats + 1):  # the first call warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, args: argparse.Namespace, device: torch.device, stock: SamParser) -> dict:
    """Measure one method; see the module docstring. Inference alternates with the stock model, call by call, and
    the ratio is the median of the per-call ratios (machine load drifts hit both alike)."""
    model = SamParser(args.backbone, args.checkpoint, **METHODS[name]).to(device)
    summary = trainable_summary(model)
    encoder = sum(t for part, (t, _) in summary.items() if part.startswith("image_encoder"))
    buffer = io.BytesIO()
    torch.save(coefficient_state(model), buffer)
    images, masks, boxes = (t.to(device) for t in demo_batch(args.batch_size, model.image_size, seed=1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def train_step() -> None:
        optimizer.zero_grad()
        F.binary_cross_entropy_with_logits(model(images, boxes), masks).backward()
        optimizer.step()

    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = _median_time(train_step, args.repeats, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    model.eval()
    if name != "parser_official":  # the original code cannot merge: it runs factored at inference
        model.merge()
    ratios = []
    with torch.no_grad():
        for _ in range(args.repeats):
            ours = _median_time(lambda: model(images, boxes), 1, device)
            reference = _median_time(lambda: stock(images, boxes), 1, device)
            ratios.append(ours / reference)
    return {"method": name, "encoder": encoder, "total": summary["total"][0], "bytes": buffer.tell(),
            "step": step, "peak": peak, "infer": statistics.median(ratios)}  # fmt: skip


def render(rows: list[dict], header: str) -> str:
    """The Markdown table, ratios to decoder_only and to the stock model."""
    base = next(r for r in rows if r["method"] == "decoder_only")
    lines = [header, "", "| method | trainable encoder | trainable total | checkpoint | step / decoder_only | "
             "peak memory / decoder_only | inference / stock |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        memory = "n/a (CPU)" if r["peak"] != r["peak"] else f"{r['peak'] / base['peak']:.2f}"
        lines.append(
            f"| {r['method']} | {r['encoder']:,} | {r['total']:,} | {r['bytes'] / 1e6:.1f} MB | "
            f"{r['step'] / base['step']:.2f} | {memory} | {r['infer']:.3f} |"
        )
    lines += ["", f"decoder_only step: {base['step'] * 1e3:.0f} ms (median); inference ratios are medians of per-call "
              "ratios, each call of a fine-tuned model followed by one of the stock model."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="lite_medsam", help="backbone (default lite_medsam)")
    parser.add_argument("--checkpoint", default=None, help="base checkpoint path (ViT backbones)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run")
    parser.add_argument("--batch-size", type=int, default=2, help="images per step (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (default 3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--output", help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    methods = list(dict.fromkeys(["decoder_only", *args.methods]))
    device = torch.device(args.device)
    rows = []
    try:
        stock = SamParser(args.backbone, args.checkpoint, coefficients=None, trainable="decoder").to(device).eval()
        for name in tqdm(methods, desc="methods", unit="method"):
            rows.append(measure(name, args, device, stock))
    except (ImportError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = f"{args.backbone} on {name}, torch {torch.__version__}, batch {args.batch_size}, {args.repeats} repeats"
    table = render(rows, header)
    print(table)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
