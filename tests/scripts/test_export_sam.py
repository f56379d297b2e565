# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""scripts/export_sam.py / ``samparser-export``: the exported stock checkpoint loads into the stock builders (and
segment_anything) and gives the merged model's masks; TorchScript reproduces it; refusals are one sentence, exit 1."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sam_reference import stock_masks

from samparser_monai.export import ExportError, export_merged, main, read_coefficient_checkpoint
from samparser_monai.networks import (
    BACKBONES,
    SamParser,
    coefficient_state,
    file_sha256,
    save_coefficient_state,
    svd_layers,
)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "export_sam.py"
BOXES = torch.tensor(
    [[[10.0, 12.0, 70.0, 90.0], [40.0, 30.0, 120.0, 100.0]], [[0.0, 0.0, 127.0, 127.0], [5, 60, 50, 80]]]
)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def _finetune(model: SamParser, seed: int = 7, scale: float = 0.2) -> SamParser:
    """Stand-in for training: scale the SVD coefficients and nudge the mask decoder, deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in svd_layers(model).values():
            layer.coefficients.mul_(1 + scale * torch.randn(layer.coefficients.shape, generator=g))
        for p in model.mask_decoder.parameters():
            p.add_(0.1 * scale * p.std().nan_to_num(1.0) * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def tuned_tiny(tmp_path_factory) -> tuple[SamParser, Path, SamParser]:
    """A 'fine-tuned' tiny SamParser (every encoder layer decomposed, random base), its coefficient state file and a
    merged copy."""
    model = _finetune(SamParser("tiny", coefficients="encoder"))
    model.training_prompts = {"click_fraction": 0.0, "mask_prompt_fraction": 0.5}
    path = save_coefficient_state(model, tmp_path_factory.mktemp("tuned") / "model.pt")
    return model, Path(path), copy.deepcopy(model).merge()


@pytest.mark.slow
def test_cli_exports_a_stock_tiny_checkpoint_with_the_merged_models_masks(tuned_tiny, tmp_path):
    model, state_path, merged_model = tuned_tiny
    result = _run("--checkpoint", str(state_path), "--backbone", "tiny", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    stock_path, record_path = tmp_path / "tiny_samparser.pth", tmp_path / "tiny_samparser.json"
    assert sorted(os.listdir(tmp_path)) == ["tiny_samparser.json", "tiny_samparser.pth"]
    assert str(stock_path) in result.stdout

    state = torch.load(stock_path, weights_only=True)
    assert all(type(v) is torch.Tensor for v in state.values()), "plain tensors only"
    stock = BACKBONES["tiny"][1]()
    stock.load_state_dict(state, strict=True)
    torch.manual_seed(4)
    image = torch.rand(2, 1, 128, 128)
    with torch.no_grad():
        tuned = model(image, BOXES)
        base = SamParser("tiny", coefficients=None, trainable="decoder").eval()(image, BOXES)
        merged = merged_model(image, BOXES)
    assert (tuned - base).abs().max() > 1e-2, "the stand-in fine-tune must change the outputs"
    assert (stock_masks(stock.eval(), image, BOXES, 128) - merged).abs().max() < 1e-4
    assert (merged - tuned).abs().max() < 1e-4

    record = json.loads(record_path.read_text())
    assert record["backbone"] == "tiny" and record["base_sha256"] == model.base_sha256 == "random-init:tiny:seed=0"
    assert record["coefficients"] == "encoder" and record["trainable"] == "parser"
    assert record["source_checkpoint"] == str(state_path.resolve())
    assert record["stock_checkpoint"]["sha256"] == file_sha256(stock_path)
    assert record["torchscript"] is None
    # how far the coefficients moved, per group, recorded and printed
    assert record["coefficient_parametrization"] == "additive"
    moved = record["coefficient_movement"]
    assert set(moved) == {"patch_embed", "attention", "mlp", "neck", "all"} and moved["all"]["median"] > 0.05
    assert "coefficients moved from their pretrained values: patch_embed" in result.stdout
    # what it was trained with, so a user of the stock file knows to pass the previous mask when propagating
    assert record["training_prompts"] == {"click_fraction": 0.0, "mask_prompt_fraction": 0.5}
    assert "trained with: boxes, mask prompts on 50% of the samples (prompt it with the previous" in result.stdout


def test_a_training_checkpoint_exports_the_same_weights(tuned_tiny, tmp_path):
    model, state_path, _ = tuned_tiny
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    nested = tmp_path / "checkpoint_epoch=3.pt"
    torch.save(
        {"model": coefficient_state(model), "optimizer": optimizer.state_dict(), "trainer": {"epoch": 3}}, nested
    )
    assert read_coefficient_checkpoint(nested)["base_sha256"] == model.base_sha256
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = export_merged(state_path, tmp_path / "a")
    b = export_merged(nested, tmp_path / "b", backbone="tiny", name="latest")
    assert b.stock_path.name == "latest.pth" and b.metadata["source_checkpoint"] == str(nested.resolve())
    first, second = torch.load(a.stock_path, weights_only=True), torch.load(b.stock_path, weights_only=True)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("coefficients, trainable", [(None, "decoder"), ("paper", "full"), ("paper", "coefficients")])
def test_every_trainable_policy_exports(coefficients, trainable, tmp_path):
    model = SamParser("tiny", coefficients=coefficients, trainable=trainable)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.05)
    expected_model = copy.deepcopy(model).eval().merge()
    result = export_merged(save_coefficient_state(model, tmp_path / "model.pt"), tmp_path)
    assert result.metadata["coefficients"] == coefficients and result.metadata["trainable"] == trainable
    stock = BACKBONES["tiny"][1]()
    stock.load_state_dict(torch.load(result.stock_path, weights_only=True), strict=True)
    torch.manual_seed(6)
    image = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        expected = expected_model(image, BOXES)
    assert (stock_masks(stock.eval(), image, BOXES, 128) - expected).abs().max() < 1e-4


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_reproduces_the_merged_model(tuned_tiny, tmp_path, capsys):
    _, state_path, merged = tuned_tiny
    assert main(["--checkpoint", str(state_path), "--output-dir", str(tmp_path), "--torchscript"]) == 0
    assert "reproduces the eager model on a second input" in capsys.readouterr().out
    record = json.loads((tmp_path / "tiny_samparser.json").read_text())
    assert record["torchscript"]["file"] == "tiny_samparser.ts"
    assert record["torchscript"]["sha256"] == file_sha256(tmp_path / "tiny_samparser.ts")
    assert record["torchscript"]["check_max_abs_difference"] <= 1e-4

    traced = torch.jit.load(str(tmp_path / "tiny_samparser.ts"))
    torch.manual_seed(5)
    image = torch.rand(2, 1, 128, 128)  # batch, boxes per image and channels other than the 1 x 3 x S x S trace
    with torch.no_grad():
        expected, got = merged(image, BOXES), traced(image, BOXES)
    assert got.shape == expected.shape == (2, 2, 128, 128)
    assert (got - expected).abs().max() < 1e-4


def test_a_failed_trace_is_one_sentence_and_writes_nothing(tuned_tiny, tmp_path, monkeypatch, capsys):
    def broken_trace(*args, **kwargs):
        raise RuntimeError("unsupported operator\nsecond line of the trace error")

    monkeypatch.setattr(torch.jit, "trace", broken_trace)
    assert main(["--checkpoint", str(tuned_tiny[1]), "--output-dir", str(tmp_path), "--torchscript"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        "error: TorchScript tracing of backbone tiny failed (RuntimeError: unsupported operator); export without "
        "--torchscript."
    )
    assert os.listdir(tmp_path) == []


def test_another_base_is_refused_with_one_sentence_and_exit_code_1(tiny_checkpoint, tmp_path):
    trained_on_file = save_coefficient_state(SamParser("tiny", tiny_checkpoint), tmp_path / "model.pt")
    out = tmp_path / "out"
    out.mkdir()
    result = _run("--checkpoint", trained_on_file, "--backbone", "tiny", "--output-dir", str(out))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: '{trained_on_file}' was trained on base tiny with sha256 ")
    assert "but the base given (the seeded random initialisation) has sha256 random-init:tiny...: " in last
    assert last.endswith("pass the base checkpoint it was trained on with --base-checkpoint.")
    assert os.listdir(out) == []


def test_another_base_refusals_in_the_library(tiny_checkpoint, other_tiny_checkpoint, tuned_tiny, tmp_path):
    on_file = save_coefficient_state(SamParser("tiny", tiny_checkpoint), tmp_path / "on_file.pt")
    with pytest.raises(ExportError, match=r"was trained on base tiny with sha256 .*: pass the base checkpoint it was"):
        export_merged(on_file, tmp_path, base_checkpoint=other_tiny_checkpoint)
    with pytest.raises(ExportError, match=r"has sha256 .*: leave --base-checkpoint out \(it was trained on the seeded"):
        export_merged(tuned_tiny[1], tmp_path, base_checkpoint=tiny_checkpoint)
    with pytest.raises(ExportError, match=r"was trained on backbone tiny, not vit_b: pass --backbone tiny"):
        export_merged(tuned_tiny[1], tmp_path, backbone="vit_b")
    # with the right base it goes through
    assert export_merged(on_file, tmp_path, base_checkpoint=tiny_checkpoint).metadata["base_checkpoint"] == str(
        Path(tiny_checkpoint).resolve()
    )


def test_existing_outputs_are_refused_without_overwrite(tuned_tiny, tmp_path, capsys):
    args = ["--checkpoint", str(tuned_tiny[1]), "--output-dir", str(tmp_path), "--name", "release"]
    (tmp_path / "release.json").write_text("{}")
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: Output '{tmp_path / 'release.json'}' already exists; pass --overwrite to replace it or choose --name."
    )
    assert os.listdir(tmp_path) == ["release.json"]
    (tmp_path / "release.ts").write_text("stale")
    assert main([*args, "--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["release.json", "release.pth"], "a stale TorchScript file is removed"
    assert json.loads((tmp_path / "release.json").read_text())["backbone"] == "tiny"


def test_output_folder_problems_fail_before_any_work(tmp_path, capsys):
    missing = tmp_path / "nope"
    # the checkpoint does not exist either: the folder is checked first
    assert main(["--checkpoint", str(tmp_path / "absent.pt"), "--output-dir", str(missing)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: Output folder '{missing}' does not exist; create it first or pass another --output-dir."
    )
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert main(["--checkpoint", str(tmp_path / "absent.pt"), "--output-dir", str(a_file)]) == 1
    assert "is not a folder; create it first" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "absent.pt"), "--output-dir", str(tmp_path)]) == 1
    assert f"Coefficient checkpoint '{tmp_path / 'absent.pt'}' does not exist" in capsys.readouterr().err


def test_an_unwritable_output_folder_fails_before_any_work(tmp_path, monkeypatch, capsys):
    def denied(*args, **kwargs):  # what a read-only folder gives a non-root user (root would bypass a chmod)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("samparser_monai.export.tempfile.TemporaryFile", denied)
    assert main(["--checkpoint", str(tmp_path / "absent.pt"), "--output-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: Output folder '{tmp_path}' is not writable (Permission denied); pass a folder you can write to with "
        "--output-dir."
    )


def test_a_file_that_is_not_a_coefficient_checkpoint_is_refused(tmp_path, capsys):
    stock = tmp_path / "sam.pth"
    torch.save(BACKBONES["tiny"][1]().state_dict(), stock)
    assert main(["--checkpoint", str(stock), "--output-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: '{stock}' is neither a SAM-PARSER coefficient state nor a training checkpoint holding one under "
        "'model'; pass bundle/models/model.pt or a checkpoint_epoch=N.pt written by the bundle's training."
    )


@pytest.mark.slow
def test_help_and_bad_arguments():
    result = _run("--help")
    assert result.returncode == 0
    assert "--checkpoint" in result.stdout and "--torchscript" in result.stdout and "--overwrite" in result.stdout
    assert _run("--backbone", "tiny").returncode == 2  # argparse: --checkpoint and --output-dir are required


@pytest.mark.slow
def test_exported_vit_b_loads_into_segment_anything_and_gives_the_merged_models_masks(tmp_path):
    """The real requirement, on SAM ViT-B (random base, the paper's neck coefficients): stock Sam.forward on the
    exported checkpoint gives the masks of our merged model."""
    from segment_anything import sam_model_registry

    model = _finetune(SamParser("vit_b", coefficients="paper"), scale=0.3)
    state_path = save_coefficient_state(model, tmp_path / "model.pt")
    out = tmp_path / "out"
    out.mkdir()
    result = export_merged(state_path, out, backbone="vit_b")
    assert result.metadata["coefficients"] == "paper" and result.metadata["base_sha256"] == "random-init:vit_b:seed=0"

    sam = sam_model_registry["vit_b"](checkpoint=str(result.stock_path)).eval()
    yy, xx = torch.meshgrid(torch.arange(1024.0), torch.arange(1024.0), indexing="ij")
    disk = (((yy - 480) / 260) ** 2 + ((xx - 560) / 200) ** 2 <= 1).float()
    g = torch.Generator().manual_seed(0)
    image = (60 + 120 * disk + 20 * torch.randn(1024, 1024, generator=g)).clamp(0, 255).expand(3, -1, -1)
    box = torch.tensor([[340.0, 200.0, 780.0, 760.0]])
    with torch.no_grad():
        stock_out = sam([{"image": image, "boxes": box, "original_size": (1024, 1024)}], multimask_output=False)[0]
        stock_logits = sam.postprocess_masks(stock_out["low_res_logits"], (1024, 1024), (1024, 1024))
        ours = model.merge()(image[None] / 255, box[None])
    assert stock_out["masks"].shape == ours.shape == (1, 1, 1024, 1024)
    assert 0.001 < (ours > 0).float().mean().item() < 0.999, "the masks must not be trivially empty or full"
    agreement = (stock_out["masks"] == (ours > 0)).float().mean().item()
    assert agreement >= 0.999, f"binary masks agree on {agreement:.5f} of the pixels"
    scale = max(1.0, ours.abs().max().item())
    assert (stock_logits - ours).abs().max().item() < 1e-3 * scale


@pytest.mark.parametrize("junk", [b"abcd", b"not a checkpoint", b"PK\x03\x04 truncated zip"])
def test_junk_coefficient_checkpoint_is_one_sentence(tmp_path, junk):
    path = tmp_path / "model.pt"
    path.write_bytes(junk)
    with pytest.raises(ExportError, match="could not be read: .*; pass the model.pt that training wrote"):
        read_coefficient_checkpoint(path)
