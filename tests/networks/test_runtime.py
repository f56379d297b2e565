# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Inference runtimes: the prepared PyTorch encoder and onnxruntime give eager PyTorch's masks, the export is cached
per weights, and a missing package is one sentence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from samparser_monai.networks import runtime
from samparser_monai.networks.artefacts import merged_model
from samparser_monai.networks.runtime import OnnxImageEncoder, TorchImageEncoder, fuse_conv_batchnorm, use_runtime

pytest.importorskip("onnxruntime", reason="the cpu extra (onnxruntime) is not installed")
CONFTEST_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


def test_folded_batch_norms_compute_what_conv_and_norm_computed():
    torch.manual_seed(0)
    block = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.GELU()
    )
    norm = block[1]
    norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2), norm.weight.data.uniform_(0.5, 2)
    outer = torch.nn.Sequential(block, torch.nn.BatchNorm2d(8)).eval()  # a norm after a non-conv stays
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        expected = outer(x)
        assert fuse_conv_batchnorm(outer) == 1
        got = outer(x)
    assert isinstance(block[1], torch.nn.Identity) and isinstance(outer[1], torch.nn.BatchNorm2d)
    assert torch.allclose(got, expected, atol=1e-5)
    training = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.BatchNorm2d(8)).train()
    assert fuse_conv_batchnorm(training) == 0, "a norm in training mode uses batch statistics: never folded"


def test_prepared_torch_encoder_gives_the_eager_embeddings_and_masks():
    image = torch.rand(3, 1, 40, 52)
    box = torch.tensor([[[5.0, 6.0, 30.0, 28.0]], [[10.0, 3.0, 45.0, 35.0]], [[0.0, 0.0, 52.0, 40.0]]])
    reference = merged_model("tiny").eval()
    with torch.inference_mode():
        expected = reference(image, box)
        embeddings = reference.encode(image)
    model = use_runtime(merged_model("tiny").eval(), "torch")
    assert isinstance(model.image_encoder, TorchImageEncoder)
    assert use_runtime(model, "torch") is model and isinstance(model.image_encoder, TorchImageEncoder), "idempotent"
    with torch.inference_mode():
        got = model(image, box)
        got_embeddings = model.encode(image)
    assert got_embeddings.is_contiguous() and got_embeddings.shape == embeddings.shape
    assert torch.allclose(got_embeddings, embeddings, atol=1e-5)
    assert torch.allclose(got, expected, atol=1e-4)
    assert use_runtime(merged_model("tiny").eval(), "eager").image_encoder.__class__.__name__ != "TorchImageEncoder"
    for other in ("onnxruntime", "torch-bf16"):
        with pytest.raises(ValueError, match=f"already runs in runtime 'torch'; build the model again for '{other}'"):
            use_runtime(model, other)


def test_bfloat16_runtime_returns_fp32_embeddings_close_to_eager():
    image = torch.rand(2, 1, 40, 52)
    model = use_runtime(merged_model("tiny").eval(), "torch-bf16")
    seen = {}
    encoder = model.image_encoder.encoder
    encoder.patch_embed.register_forward_hook(lambda m, a, out: seen.setdefault("patch_embed", out.dtype) and None)
    encoder.blocks[0].mlp.register_forward_hook(lambda m, a, out: seen.setdefault("block", out.dtype) and None)
    with torch.inference_mode():
        expected = merged_model("tiny").eval().encode(image)
        got = model.encode(image)
    assert seen == {"patch_embed": torch.float32, "block": torch.bfloat16}, "the image is embedded in fp32"
    assert got.dtype == torch.float32 and got.shape == expected.shape
    error = float((got - expected).norm() / expected.norm())
    assert 0 < error < 0.05, error


def test_bfloat16_runtime_also_runs_the_decoder_transformer_in_bfloat16():
    image = torch.rand(2, 1, 40, 52)
    box = torch.tensor([[[5.0, 6.0, 30.0, 28.0]], [[10.0, 3.0, 45.0, 35.0]]])
    reference = merged_model("tiny").eval()
    model = use_runtime(merged_model("tiny").eval(), "torch-bf16")
    assert model.mask_decoder.state_dict().keys() == reference.mask_decoder.state_dict().keys(), "names unchanged"
    seen = []
    model.mask_decoder.transformer.final_attn_token_to_image.register_forward_hook(
        lambda module, args, out: seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
    )
    with torch.inference_mode():
        embeddings = reference.encode(image)  # the decoder alone: the same embeddings for both
        expected = reference.decode(embeddings, box, image.shape[-2:])
        got = model.decode(embeddings, box, image.shape[-2:])
        logits, iou = model.decode_prompts(embeddings, image.shape[-2:], box=box[:, 0])
    assert seen and all(enabled and dtype == torch.bfloat16 for enabled, dtype in seen), seen
    assert got.dtype == logits.dtype == iou.dtype == torch.float32 and got.shape == expected.shape
    error = float((got - expected).norm() / expected.norm())
    assert 0 < error < 0.05, error
    assert torch.allclose(logits, got[:, 0], atol=1e-4)


def test_onnxruntime_encoder_matches_torch_and_is_exported_once_per_weights(tmp_path):
    image = torch.rand(2, 1, 40, 52)
    box = torch.tensor([[[5.0, 6.0, 30.0, 28.0]], [[10.0, 3.0, 45.0, 35.0]]])
    reference = merged_model("tiny").eval()
    with torch.inference_mode():
        expected = reference(image, box)
    model = use_runtime(merged_model("tiny").eval(), "onnxruntime", threads=1, cache_dir=tmp_path)
    assert isinstance(model.image_encoder, OnnxImageEncoder)
    with torch.inference_mode():
        got = model(image, box)
    assert torch.allclose(got, expected, atol=1e-3), float((got - expected).abs().max())
    exported = sorted(tmp_path.glob("*.onnx"))
    assert len(exported) == 1 and exported[0].name.startswith("tiny-encoder-")
    stamp = exported[0].stat().st_mtime_ns
    use_runtime(merged_model("tiny").eval(), "onnxruntime", cache_dir=tmp_path)  # same weights: the same file
    assert sorted(tmp_path.glob("*.onnx")) == exported and exported[0].stat().st_mtime_ns == stamp
    other = merged_model("tiny").eval()
    with torch.no_grad():
        other.image_encoder.neck[0].weight.mul_(1.01)  # another checkpoint: another file, never the old one
    use_runtime(other, "onnxruntime", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.onnx"))) == 2 and not list(tmp_path.glob(".partial*"))


def test_a_missing_runtime_package_is_one_sentence(monkeypatch):
    monkeypatch.setattr(runtime, "optional_import", lambda name: (None, False))
    with pytest.raises(ImportError, match=r"needs the onnxruntime and onnx packages, which are not installed: pip"):
        use_runtime(merged_model("tiny").eval(), "onnxruntime")
    with pytest.raises(ValueError, match="Unknown runtime 'openvino'"):
        use_runtime(merged_model("tiny").eval(), "openvino")


@pytest.mark.slow
@pytest.mark.skipif(not CONFTEST_DATA.is_dir(), reason=f"real data not found at {CONFTEST_DATA}")
@pytest.mark.parametrize("name", ["torch", "torch-bf16", "onnxruntime"])
def test_runtime_masks_match_eager_torch_on_a_real_lite_medsam_slice(tmp_path, name):
    import nibabel as nib

    case = CONFTEST_DATA / "msd_hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
    volume = np.asarray(nib.load(case).dataobj, np.float32)
    label = np.asarray(nib.load(str(case).replace("imagesTr", "labelsTr")).dataobj) > 0
    k = int(label.sum(axis=(0, 1)).argmax())
    plane = volume[:, :, k]
    plane = (plane - plane.min()) / max(float(plane.max() - plane.min()), 1e-6)
    rows, cols = np.nonzero(label[:, :, k])
    box = torch.tensor([[[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]]], dtype=torch.float32)
    image = torch.from_numpy(plane)[None, None]
    with torch.inference_mode():
        expected = merged_model("lite_medsam").eval()(image, box) > 0
        model = use_runtime(merged_model("lite_medsam").eval(), name, cache_dir=tmp_path)
        if name == "torch":
            assert model.image_encoder.fused > 0, "LiteMedSAM's TinyViT has conv + batch norm pairs to fold"
        got = model(image, box) > 0
    # the exact runtimes give eager's masks; bfloat16 is an approximation (docs/benchmarks.md: label maps agree at
    # Dice ~0.98 with eager's, Dice against the reference within 0.007 per case), measured here at 0.976
    assert expected.any() and _dice(got, expected) >= (0.95 if name == "torch-bf16" else 0.99)
