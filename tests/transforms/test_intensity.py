# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Intensity presets to [0, 1]: CT windows, MR percentiles, named presets and grey-to-RGB."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from samparser_monai.transforms import (
    CT_WINDOWS,
    CTWindowd,
    GreyToRGBd,
    IntensityPresetd,
    PercentileNormalized,
)


def as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@pytest.mark.parametrize("name", sorted(CT_WINDOWS))
def test_ct_window_edges(name):
    level, width = CT_WINDOWS[name]
    hu = np.array([[[level - width / 2, level + width / 2, level, level - width, level + width, -3000.0, 5000.0]]])
    out = CTWindowd("image", window=name)({"image": hu.astype(np.int16 if name != "lung" else np.float32)})["image"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], [0.0, 1.0, 0.5, 0.0, 1.0, 0.0, 1.0], atol=1e-6)


def test_ct_window_types_and_custom_window():
    table = {"abdomen": (40, 400), "liver": (80, 150), "bone": (400, 1800), "lung": (-600, 1500)}
    table.update({"brain": (40, 80), "mediastinum": (50, 350)})
    assert {k: tuple(v) for k, v in CT_WINDOWS.items()} == table
    hu = torch.tensor([[[-160.0, 240.0, float("nan")]]])
    meta = MetaTensor(hu, meta={"filename_or_obj": "ct.nii.gz"})
    for img in (hu, meta, hu.numpy()):
        out = CTWindowd("image", window=(40, 400))({"image": img})["image"]
        assert type(out) is type(img)
        np.testing.assert_allclose(as_numpy(out)[0, 0], [0.0, 1.0, 0.0])
    assert CTWindowd("image")({"image": meta})["image"].meta["filename_or_obj"] == "ct.nii.gz"
    with pytest.raises(ValueError, match="abdomen"):
        CTWindowd("image", window="heart")
    with pytest.raises(ValueError, match="width"):
        CTWindowd("image", window=(40, 0))


def test_percentiles_uint8_volume():
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 256, size=(1, 16, 20, 12), dtype=np.uint8)
    out = PercentileNormalized("image")({"image": vol})["image"]
    assert out.dtype == np.float32 and out.shape == vol.shape
    assert out.min() == 0.0 and out.max() == 1.0
    lo, hi = np.percentile(vol.astype(np.float64), [0.5, 99.5])
    np.testing.assert_allclose(out, np.clip((vol - lo) / (hi - lo), 0, 1), atol=1e-6)


@pytest.mark.parametrize("peak", [1e5, 1e12, 3e38])
def test_percentiles_wild_float_range(peak):
    rng = np.random.default_rng(1)
    vol = (rng.random((2, 24, 24)) * peak).astype(np.float32)
    vol[0, 0, 0] = -peak
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = PercentileNormalized("image", lower=1, upper=99)({"image": torch.as_tensor(vol)})["image"]
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.min() == 0.0 and out.max() == 1.0
    assert 0.4 < out.mean() < 0.6  # uniform data stays roughly uniform in [0, 1]


def test_percentiles_constant_volume_is_zeros_without_warnings():
    for vol in (np.full((1, 8, 8, 4), 7.0, np.float32), np.zeros((1, 5, 5), np.uint8), torch.full((3, 6, 6), -2.0)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = PercentileNormalized("image")({"image": vol})["image"]
            unit = IntensityPresetd("image", "unit")({"image": vol})["image"]
        assert (as_numpy(out) == 0).all() and (as_numpy(unit) == 0).all()


def test_percentiles_ignore_nan_voxels():
    rng = np.random.default_rng(2)
    vol = rng.normal(100.0, 30.0, size=(1, 20, 20)).astype(np.float32)
    vol[0, :3] = np.nan
    vol[0, 5, 5] = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = PercentileNormalized("image")({"image": vol})["image"]
    assert np.isfinite(out).all()
    assert (out[0, :3] == 0).all() and out[0, 5, 5] == 1.0
    finite = vol[np.isfinite(vol)].astype(np.float64)
    lo, hi = np.percentile(finite, [0.5, 99.5])
    expected = np.clip((vol[0, 3:].astype(np.float64) - lo) / (hi - lo), 0, 1)  # float64 under numpy 1 and 2
    np.testing.assert_allclose(out[0, 3:], np.nan_to_num(expected, posinf=1.0))
    all_nan = np.full((1, 4, 4), np.nan, np.float32)
    assert (PercentileNormalized("image")({"image": all_nan})["image"] == 0).all()


def test_percentiles_nonzero_and_meta():
    vol = np.zeros((1, 10, 10), np.float32)
    vol[0, 2:8, 2:8] = np.linspace(50, 150, 36).reshape(6, 6)
    img = MetaTensor(torch.as_tensor(vol), meta={"filename_or_obj": "mr.nii.gz"})
    out = PercentileNormalized("image", lower=0, upper=100, nonzero=True)({"image": img})["image"]
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "mr.nii.gz"
    assert (out[vol == 0] == 0).all()
    assert out[0, 2, 2] == 0.0 and out[0, 7, 7] == 1.0
    with pytest.raises(ValueError, match="lower"):
        PercentileNormalized("image", lower=60, upper=40)


def test_intensity_presets():
    rng = np.random.default_rng(3)
    ct = rng.uniform(-1000, 1000, size=(1, 8, 8)).astype(np.float32)
    data = {"image": ct}
    np.testing.assert_array_equal(
        IntensityPresetd("image", "mr")(data)["image"], PercentileNormalized("image")(data)["image"]
    )
    for window in CT_WINDOWS:
        np.testing.assert_array_equal(
            IntensityPresetd("image", f"ct_{window}")(data)["image"], CTWindowd("image", window)(data)["image"]
        )
    unit = IntensityPresetd("image", "unit")(data)["image"]
    assert unit.dtype == np.float32 and unit.min() == 0.0 and unit.max() == 1.0
    assert IntensityPresetd("image", "none")(data)["image"] is ct
    with pytest.raises(ValueError, match="ct_abdomen") as err:
        IntensityPresetd("image", "ct_heart")
    assert "mr" in str(err.value) and "unit" in str(err.value)


def test_grey_to_rgb():
    grey = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    out = GreyToRGBd("image")({"image": grey})["image"]
    assert out.shape == (3, 3, 4) and all((out[c] == grey[0]).all() for c in range(3))
    meta = MetaTensor(torch.as_tensor(grey)[..., None], meta={"filename_or_obj": "a.png"})
    out = GreyToRGBd("image")({"image": meta})["image"]
    assert isinstance(out, MetaTensor) and out.shape == (3, 3, 4, 1) and out.meta["filename_or_obj"] == "a.png"
    rgb = torch.rand(3, 5, 5)
    assert GreyToRGBd("image")({"image": rgb})["image"] is rgb
    with pytest.raises(ValueError, match="1 or 3 channels"):
        GreyToRGBd("image")({"image": np.zeros((2, 4, 4))})
