# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""A cache of the frozen image-encoder trunk's features, for methods that train only the neck and what follows.

With SAM-PARSER's paper preset the trainable coefficients sit in the encoder neck: everything before it (patch
embedding and transformer blocks, almost all of the encoder's cost) is frozen and deterministic, so its output for a
given input image never changes. The cache keys each preprocessed image by a hash of its bytes and keeps the trunk
output, so every epoch after the first skips the trunk for slices it has seen (training and validation alike).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch

__all__ = ["TrunkFeatureCache"]


class TrunkFeatureCache:
    """Least-recently-used cache of trunk features keyed by the input image's bytes.

    Args:
        max_bytes: memory budget of the stored features; the least recently used go first.
        device: where features are kept (default CPU memory; ``None`` keeps them where they were computed).
    """

    def __init__(self, max_bytes: int = 4 << 30, device: str | torch.device | None = "cpu") -> None:
        self.max_bytes, self.device = int(max_bytes), device
        self.store: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = self.hits = self.misses = 0

    @staticmethod
    def key(image: torch.Tensor) -> str:
        """Hash of one preprocessed image (its dtype, shape and bytes)."""
        data = image.detach().contiguous().cpu()
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{data.dtype}{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def __call__(self, images: torch.Tensor, trunk: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Trunk features of ``images`` (``B x ...``): cached ones reused, the others computed in one batch."""
        keys = [self.key(image) for image in images]
        out: list[torch.Tensor | None] = [None] * len(keys)
        for i, k in enumerate(keys):  # hits first, so storing the misses cannot evict what this batch needs
            if k in self.store:
                out[i] = self.store[k].to(images.device)
                self.store.move_to_end(k)
        missing = [i for i, feature in enumerate(out) if feature is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            with torch.no_grad():
                features = trunk(images[missing])
            for i, feature in zip(missing, features):
                out[i] = feature
                self._put(keys[i], feature)
        return torch.stack(out)

    def _put(self, key: str, feature: torch.Tensor) -> None:
        stored = feature.detach().to(self.device) if self.device is not None else feature.detach()
        self.store[key] = stored
        self.bytes += stored.numel() * stored.element_size()
        while self.bytes > self.max_bytes and len(self.store) > 1:
            _, evicted = self.store.popitem(last=False)
            self.bytes -= evicted.numel() * evicted.element_size()

    def clear(self) -> None:
        """Forget every stored feature (e.g. after changing the trunk's weights)."""
        self.store.clear()
        self.bytes = 0
