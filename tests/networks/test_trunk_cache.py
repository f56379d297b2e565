# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""The trunk feature cache is exact, skips the trunk for seen images, keeps to its budget, refuses a trained trunk."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samparser_monai.networks import SamParser
from samparser_monai.networks.trunk_cache import TrunkFeatureCache, trunk_fingerprint

BOXES = torch.tensor([[[10.0, 12.0, 70.0, 90.0]], [[20.0, 30.0, 110.0, 100.0]]])


def _losses(model: SamParser, images: torch.Tensor, targets: torch.Tensor, epochs: int = 3) -> list[float]:
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(epochs):
        for i in range(0, len(images), 2):
            optimizer.zero_grad()
            loss = F.binary_cross_entropy_with_logits(model(images[i : i + 2], BOXES), targets[i : i + 2])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


def test_training_with_the_cache_gives_the_same_losses_and_skips_the_trunk(tiny_checkpoint):
    torch.manual_seed(1)
    images, targets = torch.rand(4, 1, 128, 128), (torch.rand(4, 1, 128, 128) > 0.5).float()
    plain = _losses(SamParser("tiny", tiny_checkpoint), images, targets)
    model = SamParser("tiny", tiny_checkpoint, cache_trunk=True)
    calls = []
    model.image_encoder.blocks[0].register_forward_hook(lambda *args: calls.append(1))
    cached = _losses(model, images, targets)
    assert max(abs(a - b) for a, b in zip(plain, cached)) < 1e-6, "the cache must not change training"
    assert len(calls) == 2, "4 images in batches of 2: the trunk runs in epoch 1 only"
    assert model.trunk_cache.hits == 8 and model.trunk_cache.misses == 4


def test_cache_budget_evicts_least_recently_used():
    cache = TrunkFeatureCache(max_bytes=2 * 4 * 4)  # room for two 4-float features
    trunk = lambda x: x.flatten(1)[:, :4] * 2  # noqa: E731
    images = torch.arange(12.0).view(3, 1, 2, 2)
    cache(images[:2], trunk)
    cache(images[:1], trunk)  # image 0 becomes the most recent
    cache(images[2:], trunk)  # evicts image 1
    assert cache.key(images[0]) in cache.store and cache.key(images[1]) not in cache.store
    assert cache.bytes == 32
    assert torch.equal(cache(images, trunk), images.flatten(1)[:, :4] * 2)


def test_cache_refuses_a_trained_trunk():
    with pytest.raises(ValueError, match="cache_trunk needs a frozen encoder trunk"):
        SamParser("tiny", coefficients="encoder", cache_trunk=True)
    with pytest.raises(ValueError, match="cache_trunk needs a frozen encoder trunk"):
        SamParser("tiny", coefficients=None, trainable="full", cache_trunk=True)


def test_trunk_fingerprint_follows_the_trunk_weights_only(tiny_checkpoint, other_tiny_checkpoint):
    paper = SamParser("tiny", tiny_checkpoint, coefficients="paper", trainable="parser")
    stock = SamParser("tiny", tiny_checkpoint, coefficients=None, trainable="decoder")
    other = SamParser("tiny", other_tiny_checkpoint, coefficients=None, trainable="decoder")
    assert trunk_fingerprint(paper.image_encoder) == trunk_fingerprint(stock.image_encoder), "neck is not trunk"
    assert trunk_fingerprint(stock.image_encoder) != trunk_fingerprint(other.image_encoder)
    encoder = nn.Sequential(nn.BatchNorm1d(3))  # a 0-d buffer (num_batches_tracked) must hash too
    before = trunk_fingerprint(encoder)
    encoder[0].num_batches_tracked += 1
    assert trunk_fingerprint(encoder) != before


@pytest.mark.parametrize("in_place", [False, True])
def test_cache_keys_follow_the_bytes_exactly(in_place):
    cache = TrunkFeatureCache(hash_in_place=in_place)  # in place: the accelerator path, run here on the CPU
    image = torch.rand(3, 32, 32)
    nudged = image.clone()
    nudged[2, 31, 31] = torch.nextafter(nudged[2, 31, 31], torch.tensor(2.0))
    assert cache.key(image) == cache.key(image.clone())
    assert cache.key(image) != cache.key(nudged), "one ulp in the last pixel changes the key"
    assert cache.key(image) != cache.key(image.reshape(3, 16, 64)), "the shape is part of the key"
    odd = torch.randint(0, 255, (3, 5, 7), dtype=torch.uint8)  # byte count not a multiple of 4
    changed = odd.clone()
    changed[-1, -1, -1] ^= 1
    assert cache.key(odd) != cache.key(changed)
