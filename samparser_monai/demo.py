# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""``samparser-demo``: a short, offline tour of SamParser on the real LiteMedSAM weights.

It builds SAM-PARSER on LiteMedSAM, prints what is trainable, fine-tunes the coefficients and the mask decoder for a
few steps on generated demo images (noisy ellipses, not medical data), reports Dice before and after on a held-out
demo image, merges the coefficients back into plain layers (checking the outputs do not change), and saves the
coefficient checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from monai.losses import DiceCELoss
from tqdm import tqdm

from samparser_monai.networks import (
    DEFAULT_COEFFICIENT_LEARNING_RATE,
    DEFAULT_COEFFICIENT_PARAMETRIZATION,
    PARAMETRIZATIONS,
    SamParser,
    coefficient_movement,
    format_movement,
    parameter_groups,
    save_coefficient_state,
)
from samparser_monai.transforms.box_prompts import jitter_box, mask_to_box

__all__ = ["demo_batch", "main"]


def demo_batch(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generated demo images ``n x 1 x size x size`` in [0, 1]: a faint textured ellipse on a noisy background,
    with its mask and a jittered box (pixels)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, masks, boxes = [], [], []
    for _ in range(n):
        cy, cx = (0.3 + 0.4 * torch.rand(2, generator=g)) * size
        ry, rx = (0.1 + 0.12 * torch.rand(2, generator=g)) * size
        mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).float()
        background = 0.35 + 0.1 * torch.sin(xx / 9.0 + float(cy)) * torch.cos(yy / 13.0)
        image = background + 0.18 * mask + 0.08 * torch.randn(size, size, generator=g)
        box = jitter_box(mask_to_box(mask), 0.1 * size, mode="pixels", image_size=(size, size), generator=g)
        images.append(image.clamp(0, 1))
        masks.append(mask)
        boxes.append(box)
    return torch.stack(images)[:, None], torch.stack(masks)[:, None], torch.stack(boxes)[:, None]


def _dice(logits: torch.Tensor, mask: torch.Tensor) -> float:
    pred = (logits > 0).float()
    return float(2 * (pred * mask).sum() / (pred.sum() + mask.sum()).clamp_min(1))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="samparser-demo", description=__doc__.split("\n\n")[1])
    parser.add_argument("--backbone", default="lite_medsam", help="backbone name (default: lite_medsam, offline)")
    parser.add_argument("--checkpoint", default=None, help="base checkpoint path (default: the packaged weights)")
    parser.add_argument("--coefficients", default="paper", help="coefficient preset: paper or encoder")
    parser.add_argument("--steps", type=int, default=8, help="fine-tuning steps (default: 8)")
    parser.add_argument("--batch-size", type=int, default=2, help="images per step (default: 2)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the decoder (default: 1e-3)")
    parser.add_argument(
        "--coefficient-lr",
        type=float,
        default=DEFAULT_COEFFICIENT_LEARNING_RATE,
        help=f"AdamW learning rate of the SVD coefficients (default: {DEFAULT_COEFFICIENT_LEARNING_RATE:g})",
    )
    parser.add_argument(
        "--parametrization",
        choices=PARAMETRIZATIONS,
        default=DEFAULT_COEFFICIENT_PARAMETRIZATION,
        help=f"coefficient parametrization (default: {DEFAULT_COEFFICIENT_PARAMETRIZATION}, the bundle's)",
    )
    parser.add_argument("--output-dir", default="runs/demo", help="where the coefficient checkpoint goes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    args = _parse(argv)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = SamParser(
        args.backbone, args.checkpoint, coefficients=args.coefficients, coefficient_parametrization=args.parametrization
    )
    size = model.image_size
    print(f"SamParser on {args.backbone} (base sha256 {model.base_sha256[:16]}...), coefficients={args.coefficients}")
    print(model.summary())

    images, masks, boxes = demo_batch(args.batch_size, size, seed=1)
    test_image, test_mask, test_box = demo_batch(1, size, seed=2)
    with torch.no_grad():
        dice_before = _dice(model.eval()(test_image, test_box), test_mask)

    loss_fn = DiceCELoss(sigmoid=True)
    optimizer = torch.optim.AdamW(parameter_groups(model, args.lr, coefficient_learning_rate=args.coefficient_lr))
    model.train()
    progress = tqdm(range(args.steps), desc="fine-tuning (demo data)", unit="step")
    for _ in progress:
        optimizer.zero_grad()
        loss = loss_fn(model(images, boxes), masks)
        loss.backward()
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")

    print(f"coefficients moved: {format_movement(coefficient_movement(model))}")
    with torch.no_grad():
        tuned = model.eval()(test_image, test_box)
        dice_after = _dice(tuned, test_mask)
        saved = save_coefficient_state(model, Path(args.output_dir) / "coefficients.pt")
        merge_error = (model.merge()(test_image, test_box) - tuned).abs().max().item()
    print(f"held-out demo image Dice: {dice_before:.3f} before, {dice_after:.3f} after {args.steps} steps")
    print(f"merged back into plain layers: max |difference| {merge_error:.2e}")
    print(f"coefficient checkpoint: {saved} ({Path(saved).stat().st_size / 1e6:.1f} MB)")
    print(f"done in {time.perf_counter() - start:.0f} s")
    if merge_error > 1e-3:
        print("error: the merged model differs from the fine-tuned one", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
