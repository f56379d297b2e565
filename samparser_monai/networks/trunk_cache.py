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

__all__ = ["TrunkFeatureCache", "trunk_fingerprint"]


def trunk_fingerprint(image_encoder: torch.nn.Module) -> str:
    """Hash of the weights a trunk feature depends on (every encoder tensor outside ``neck``).

    Two networks with the same fingerprint compute the same trunk features, so they may share one cache.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in image_encoder.state_dict().items():
        if name.startswith("neck."):
            continue
        data = tensor.detach().contiguous().cpu()
        digest.update(f"{name}{data.dtype}{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class TrunkFeatureCache:
    """Least-recently-used cache of trunk features keyed by the input image's bytes.

    ``hits``, ``misses`` and ``evictions`` count the features reused, computed and dropped to keep to the budget (a
    cache that evicts while a pass repeats over more images than it holds reuses nothing: raise the budget).

    Args:
        max_bytes: memory budget of the stored features; the least recently used go first.
        device: where features are kept (default CPU memory; ``None`` keeps them where they were computed).
        hash_in_place: key images by a hash computed where they are (see :meth:`key`); default: for images that
            are not on the CPU.
    """

    def __init__(
        self, max_bytes: int = 4 << 30, device: str | torch.device | None = "cpu", hash_in_place: bool | None = None
    ) -> None:
        self.max_bytes, self.device, self.hash_in_place = int(max_bytes), device, hash_in_place
        self.store: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = self.hits = self.misses = self.evictions = 0
        self._weights: tuple[tuple[int, str], torch.Tensor] | None = None

    def key(self, image: torch.Tensor) -> str:
        """Hash of one preprocessed image (its dtype, shape and bytes); see :meth:`keys`."""
        return self.keys(image[None])[0]

    def keys(self, images: torch.Tensor) -> list[str]:
        """Hashes of a batch of preprocessed images (each one's dtype, shape and bytes).

        On the CPU: BLAKE2b of the bytes. On an accelerator the bytes stay there: copying a 1024 px image to the host
        and hashing it costs more than a ViT-B trunk on a current GPU, so two 64-bit linear hashes of each image's
        32-bit words with fixed random odd multipliers (arithmetic mod 2^64) are computed in place, for the whole
        batch at once; two different images collide with a probability of the order of 2^-64. Either way equal
        images give equal keys, whatever their place in a batch.
        """
        data = images.detach().contiguous()
        head = f"{data.dtype}{tuple(data.shape[1:])}"
        in_place = self.hash_in_place if self.hash_in_place is not None else data.device.type != "cpu"
        if not in_place:
            out = []
            for image in data.cpu():
                digest = hashlib.blake2b(digest_size=16)
                digest.update(head.encode())
                digest.update(image.reshape(-1).view(torch.uint8).numpy().tobytes())
                out.append(digest.hexdigest())
            return out
        raw = data.reshape(len(data), -1).view(torch.uint8)
        raw = torch.nn.functional.pad(raw, (0, -raw.shape[1] % 4)) if raw.shape[1] % 4 else raw
        words = raw.view(torch.int32).to(torch.int64)  # B x n
        multipliers = self._multipliers(words.shape[1], words.device)
        hashes = torch.stack([(words * row).sum(dim=1) for row in multipliers], dim=1)  # B x 2, sums wrap mod 2^64
        return [head + ":" + ":".join(f"{h & (2**64 - 1):016x}" for h in row) for row in hashes.tolist()]

    def _multipliers(self, n: int, device: torch.device) -> torch.Tensor:
        """Two rows of ``n`` random odd multipliers, seeded by ``n``; kept for the last size (one size in practice)."""
        if self._weights is None or self._weights[0] != (n, str(device)):
            g = torch.Generator().manual_seed(n)
            weights = torch.randint(-(2**62), 2**62, (2, n), generator=g, dtype=torch.int64) * 2 + 1
            self._weights = ((n, str(device)), weights.to(device))
        return self._weights[1]

    def __call__(self, images: torch.Tensor, trunk: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Trunk features of ``images`` (``B x ...``): cached ones reused, the others computed in one batch."""
        keys = self.keys(images)
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
            self.evictions += 1

    def clear(self) -> None:
        """Forget every stored feature (e.g. after changing the trunk's weights)."""
        self.store.clear()
        self.bytes = 0
