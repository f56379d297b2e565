# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Epoch cost of `parser_paper` training with and without the trunk feature cache, and the loss difference.

Trains SamParser (paper preset: neck coefficients + mask decoder) for a few epochs over the same slices twice, with
the same seed: once as is, once with ``cache_trunk=True``. Prints the time of every epoch of both runs, the ratio of a
later cached epoch to the first, and the largest difference between the two runs' losses (the cache is exact, so it
is float32 rounding at most).

    python scripts/benchmark_trunk_cache.py --backbone lite_medsam --slices 8 --epochs 3
    python scripts/benchmark_trunk_cache.py --backbone lite_medsam --breakdown   # where a step goes, part by part
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from monai.data import MetaTensor
from monai.losses import DiceCELoss
from tqdm import tqdm

from samparser_monai.demo import demo_batch
from samparser_monai.engines import retain_freed_host_memory
from samparser_monai.networks import SamParser


def _train(model: SamParser, images, masks, boxes, epochs: int, batch_size: int, progress: tqdm) -> tuple[list, list]:
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = DiceCELoss(sigmoid=True)
    model.train()
    times, losses = [], []
    for _ in range(epochs):
        start = time.perf_counter()
        for i in range(0, len(images), batch_size):
            optimizer.zero_grad()
            loss = loss_fn(model(images[i : i + batch_size], boxes[i : i + batch_size]), masks[i : i + batch_size])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            progress.update(1)
        times.append(time.perf_counter() - start)
    return times, losses


def _timed(fn, repeats: int, device: str) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if str(device).startswith("cuda"):
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if str(device).startswith("cuda"):
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def breakdown(
    model: SamParser, images: torch.Tensor, masks: torch.Tensor, boxes: torch.Tensor, device: str, repeats: int = 3
) -> str:
    """Where one training step of the paper preset goes, part by part, the operator calls of a cached step, and the
    host work around it (``train()``, a MetaTensor batch against a plain one).

    The trunk forward is what the cache skips; the neck (forward and backward, its coefficients train) and the mask
    decoder with the loss (forward and backward) are what a cached step still runs.
    """
    model.train()
    loss_fn = DiceCELoss(sigmoid=True)
    x = model.preprocess(images)[0]
    with torch.no_grad():
        features = model._trunk(x)
        embeddings = model.image_encoder.neck(features)
    embeddings.requires_grad_(True)

    def trunk() -> None:
        with torch.no_grad():
            model._trunk(x)

    def neck() -> None:
        model.image_encoder.neck(features).sum().backward()

    def decoder() -> None:
        loss_fn(model.decode(embeddings, boxes, images.shape[-2:]), masks).backward()

    parts = {name: _timed(fn, repeats, device) for name, fn in (("trunk forward", trunk), ("neck forward + backward",
             neck), ("decoder + loss forward + backward", decoder))}  # fmt: skip
    total = sum(parts.values())
    lines = [f"| part (batch {len(images)}) | s | share of an uncached step |", "|---|---:|---:|"]
    lines += [f"| {name} | {s:.3f} | {s / total:.3f} |" for name, s in parts.items()]
    floor = (total - parts["trunk forward"]) / total
    lines.append(f"floor of a cached step against an uncached one: {floor:.3f}")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model(images, boxes)  # fill the trunk cache (the model is built with cache_trunk=True)

    def cached_step() -> None:
        optimizer.zero_grad()
        loss_fn(model(images, boxes), masks).backward()
        optimizer.step()

    with torch.profiler.profile() as prof:
        cached_step()
    calls = sum(1 for event in prof.events() if event.cpu_parent is None)
    lines.append(f"top-level operator calls in a cached step (forward, backward, AdamW): {calls}")

    # Host work a GPU cannot hide: the trainer calls train() every step, and MONAI datasets give MetaTensors.
    lines.append(f"SamParser.train() (the trainer calls it every step): {_timed(model.train, 20, device) * 1e3:.2f} ms")
    plain_step = _timed(cached_step, repeats, device)
    images = MetaTensor(images)
    meta_step = _timed(cached_step, repeats, device)
    lines.append(f"cached step, plain batch: {plain_step:.4f} s; MetaTensor batch: {meta_step:.4f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="lite_medsam", help="backbone (default lite_medsam)")
    parser.add_argument("--checkpoint", default=None, help="base checkpoint path (ViT backbones)")
    parser.add_argument("--slices", type=int, default=8, help="training slices per epoch (default 8)")
    parser.add_argument("--batch-size", type=int, default=2, help="slices per step (default 2)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (default 3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--breakdown", action="store_true", help="instead: time a step part by part (trunk, neck, "
                        "decoder) and count a cached step's operator calls")  # fmt: skip
    parser.add_argument("--release-host-memory", action="store_true",
                        help="leave glibc returning freed host memory to the system between steps, as before the "
                        "bundle's retain_host_memory (to measure the difference)")  # fmt: skip
    args = parser.parse_args(argv)
    retain_freed_host_memory(not args.release_host_memory)
    if args.breakdown:
        model = SamParser(args.backbone, args.checkpoint, coefficients="paper", cache_trunk=True).to(args.device)
        batch = demo_batch(args.batch_size, model.image_size, seed=1)
        print(breakdown(model, *(t.to(args.device) for t in batch), device=args.device))
        return 0
    if args.epochs < 2:
        print("error: --epochs must be 2 or more to compare later epochs with the first.", file=sys.stderr)
        return 1
    runs = {}
    steps = 2 * args.epochs * -(-args.slices // args.batch_size)
    with tqdm(total=steps, desc="training", unit="step") as progress:
        for cached in (False, True):
            model = SamParser(args.backbone, args.checkpoint, coefficients="paper", cache_trunk=cached).to(args.device)
            batch = demo_batch(args.slices, model.image_size, seed=1)
            images, masks, boxes = (t.to(args.device) for t in batch)
            runs[cached] = _train(model, images, masks, boxes, args.epochs, args.batch_size, progress)
    plain_times, plain_losses = runs[False]
    cached_times, cached_losses = runs[True]
    difference = max(abs(a - b) for a, b in zip(plain_losses, cached_losses))
    setting = f"{args.slices} slices, batch {args.batch_size}, {args.epochs} epochs"
    card = torch.cuda.get_device_name(args.device) if str(args.device).startswith("cuda") else "CPU"
    print(f"torch {torch.__version__}, {args.backbone} on {card}, {setting}")
    print("| epoch | without cache (s) | with cache (s) | cached / first cached epoch |")
    print("|---:|---:|---:|---:|")
    for epoch, (a, b) in enumerate(zip(plain_times, cached_times), start=1):
        print(f"| {epoch} | {a:.2f} | {b:.2f} | {b / cached_times[0]:.3f} |")
    print(f"largest loss difference between the runs: {difference:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
