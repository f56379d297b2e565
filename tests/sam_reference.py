# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Reference predictions from segment_anything's own modules, for tests that compare SamParser with a stock SAM."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def stock_masks(stock, image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """segment_anything's modules, one image at a time, single-mask output, upsampled to the ``size`` input."""
    with torch.no_grad():
        embeddings = stock.image_encoder(image.expand(-1, 3, -1, -1))
        out = []
        for i in range(image.shape[0]):
            sparse, dense = stock.prompt_encoder(points=None, boxes=boxes[i], masks=None)
            low, _ = stock.mask_decoder(
                image_embeddings=embeddings[i : i + 1],
                image_pe=stock.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            out.append(F.interpolate(low, (size, size), mode="bilinear", align_corners=False)[:, 0])
    return torch.stack(out)
