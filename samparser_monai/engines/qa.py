# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""QA pictures: a few slices per case with the reference (green) and predicted (red) outlines and the boxes (yellow)."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

__all__ = ["QAWriter"]


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


class QAWriter:
    """Writes ``<folder>/<case>_slice<k>.png`` for ``per_case`` slices spread over the prompted/predicted slices.

    Args:
        folder: output folder.
        per_case: pictures per case.
        axis: slicing axis of the oriented volume.
        zoom: integer magnification of each picture (small slices are hard to read).
    """

    def __init__(self, folder: str, per_case: int = 3, axis: int = 2, zoom: int = 4) -> None:
        self.folder, self.per_case, self.axis, self.zoom = folder, per_case, axis, zoom

    def __call__(self, case: str, image: torch.Tensor, reference, prediction: torch.Tensor, prompts) -> list[str]:
        """Write the pictures of one case; returns their paths."""
        os.makedirs(self.folder, exist_ok=True)
        other = [d for d in range(3) if d != self.axis]
        candidates = (
            sorted(prompts)
            if isinstance(prompts, dict)
            else torch.nonzero(prediction.any(dim=other)).flatten().tolist()
        )
        if not candidates:
            return []
        chosen = sorted(
            {candidates[int(i)] for i in np.linspace(0, len(candidates) - 1, min(self.per_case, len(candidates)))}
        )
        paths = []
        for s in chosen:
            plane = image[0].select(self.axis, s).float().cpu().numpy()
            grey = (255 * (plane - plane.min()) / max(float(plane.max() - plane.min()), 1e-6)).astype(np.uint8)
            rgb = np.stack([grey] * 3, axis=-1)
            if reference is not None:
                rgb[_outline(reference[0].select(self.axis, s).cpu().numpy() > 0)] = (0, 220, 0)
            rgb[_outline(prediction.select(self.axis, s).cpu().numpy() > 0)] = (230, 30, 30)
            picture = Image.fromarray(rgb).resize((rgb.shape[1] * self.zoom, rgb.shape[0] * self.zoom), Image.NEAREST)
            draw = ImageDraw.Draw(picture)
            for _, box in prompts.get(s, []) if isinstance(prompts, dict) else []:
                x0, y0, x1, y1 = (float(v) * self.zoom for v in box)
                draw.rectangle([x0, y0, x1 + self.zoom - 1, y1 + self.zoom - 1], outline=(255, 220, 0))
            path = os.path.join(self.folder, f"{case}_slice{s:03d}.png")
            picture.save(path)
            paths.append(path)
        return paths
