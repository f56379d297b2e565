# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""The MONAI Label infer task keeps slice embeddings between prompts: same masks, bounded, new weights re-encode."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("monailabel")

from samparser_monai.engines import EmbeddingCache  # noqa: E402
from samparser_monai.label.config import LabelConfig  # noqa: E402
from samparser_monai.label.infer import SamParserInferTask  # noqa: E402
from samparser_monai.label.model import LiveModel  # noqa: E402
from samparser_monai.networks import SamParser, coefficient_state  # noqa: E402


def _image(folder: Path) -> Path:
    volume = np.zeros((40, 36, 10), np.float32)
    volume[10:25, 8:20, 2:8] = 1.0
    nib.save(nib.Nifti1Image(volume + 0.05, np.diag([1.0, 1.0, 2.0, 1.0])), str(folder / "case.nii.gz"))
    return folder / "case.nii.gz"


def _task(tmp_path: Path, cache_mb: float, published: list[Path]) -> SamParserInferTask:
    config = LabelConfig(backbone="tiny", device="cpu", embedding_cache_mb=cache_mb, repo_root=tmp_path)
    return SamParserInferTask(LiveModel(config, lambda: published[0] if published else None), config)


def _mask(path: str) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def test_a_second_prompt_on_the_same_image_runs_only_the_decoder(tmp_path):
    image = _image(tmp_path)
    published: list[Path] = []
    task = _task(tmp_path, 64, published)
    request = {"image": str(image), "roi": [8, 27, 6, 22, 2, 7]}
    first, first_params = task(dict(request))
    second, second_params = task(dict(request))
    assert first_params["encoded_slices"] > 0 and first_params["cached_slices"] == 0
    assert second_params["encoded_slices"] == 0 and second_params["cached_slices"] == first_params["encoded_slices"]
    assert np.array_equal(_mask(first), _mask(second)), "cached embeddings give the same mask"
    assert 0 < task.embeddings.nbytes <= 64 << 20
    _, refined = task({**request, "foreground": [[15, 12, 4]]})  # a corrective click inside the ROI
    assert refined["encoded_slices"] == 0, "propagation from the click stays within the ROI's cached slices"

    checkpoint = tmp_path / "model.pt"  # a training run publishes new weights: nothing cached is used for them
    trained = SamParser("tiny", coefficients="paper", trainable="parser")
    with torch.no_grad():
        next(p for n, p in trained.named_parameters() if n.endswith("coefficients")).mul_(1.5)
    torch.save(coefficient_state(trained), checkpoint)
    published.append(checkpoint)
    _, third_params = task(dict(request))
    assert third_params["checkpoint"] == str(checkpoint)
    assert third_params["cached_slices"] == 0 and third_params["encoded_slices"] == first_params["encoded_slices"]


def test_the_cache_stays_within_its_bound(tmp_path):
    task = _task(tmp_path, 0.01, [])  # 10 kB: not even one tiny-SAM slice embedding fits
    _, params = task({"image": str(_image(tmp_path)), "roi": [8, 27, 6, 22, 2, 7]})
    assert params["encoded_slices"] > 0 and len(task.embeddings) == 0 and task.embeddings.nbytes == 0


def test_least_recently_used_volumes_go_first():
    cache = EmbeddingCache(max_mb=2 * 4 / 1024)  # room for two 4 kB volumes
    for key in ("a", "b"):
        cache.volume(key)[0] = torch.zeros(1024)
    cache.volume("a")  # "a" used again: "b" is now the oldest
    cache.volume("c")[0] = torch.zeros(1024)
    cache.trim()
    assert "a" in cache and "c" in cache and "b" not in cache and cache.nbytes <= cache.max_bytes
