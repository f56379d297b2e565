# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Slice embeddings kept between prompts on the same image, so a second prompt runs only the decoder.

An interactive user prompts the same volume again and again (a click, then a corrective click, then another label).
The image encoder costs nearly all of a prompt's time and its output depends only on the image slice and the
weights, so :class:`EmbeddingCache` keeps each volume's slice embeddings under a key that names both (the image file
and its modification time, the served checkpoint, the preprocessing), in least-recently-used order within a memory
bound. The prompt engine fills the per-volume dictionary it is given
(:meth:`~samparser_monai.engines.PromptEngine.segment`'s ``embeddings``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable

import torch
from torch import nn

__all__ = ["EmbeddingCache", "encode_slices"]


class EmbeddingCache:
    """Per-volume slice embeddings (``slice index -> tensor``) in least-recently-used order, within ``max_mb``.

    Args:
        max_mb: memory bound of all stored embeddings, in MB (0: keep nothing). A volume whose own embeddings exceed
            it is not kept.
    """

    def __init__(self, max_mb: float) -> None:
        self.max_bytes = int(max_mb * (1 << 20))
        self._volumes: OrderedDict[Hashable, dict[int, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def volume(self, key: Hashable) -> dict[int, torch.Tensor]:
        """The embeddings of one volume (a dictionary the caller fills), most recently used from now on."""
        with self._lock:
            if key in self._volumes:
                self.hits += 1
                self._volumes.move_to_end(key)
                return self._volumes[key]
            self.misses += 1
            self._volumes[key] = {}
            return self._volumes[key]

    @property
    def nbytes(self) -> int:
        """Bytes of all stored embeddings."""
        return sum(_size(v) for v in self._volumes.values())

    def __len__(self) -> int:
        return len(self._volumes)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._volumes

    def trim(self) -> None:
        """Drop the least recently used volumes until the bound holds (call it after filling a volume)."""
        with self._lock:
            total = self.nbytes
            while self._volumes and total > self.max_bytes:
                _, dropped = self._volumes.popitem(last=False)
                total -= _size(dropped)

    def clear(self) -> None:
        """Drop everything (e.g. when the served weights change)."""
        with self._lock:
            self._volumes.clear()


@torch.no_grad()
def encode_slices(
    model: nn.Module,
    image: torch.Tensor,
    slices: Iterable[int],
    axis: int,
    cache: dict[int, torch.Tensor],
    batch_size: int = 8,
) -> dict[int, torch.Tensor]:
    """Encode the slices of ``image`` (``C x X x Y x Z``) along spatial ``axis`` that ``cache`` lacks, ``batch_size``
    slices a pass in ascending order, and add their embeddings to ``cache`` (returned). Every slice-wise prediction
    (oracle boxes, the 3D prompt engine) encodes through it, so a cache filled by one serves the other."""
    missing = sorted(set(slices) - set(cache))
    device = next(model.parameters()).device
    for start in range(0, len(missing), batch_size):
        chunk = missing[start : start + batch_size]
        planes = torch.stack([image.select(axis + 1, s) for s in chunk]).to(device=device, dtype=torch.float32)
        cache.update(zip(chunk, model.encode(planes)))
    return cache


def _size(volume: dict[int, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in volume.values())
