# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""The training bundle as MONAI's ConfigWorkflow runs it (model-zoo style), resume, evaluation and bad input."""

from __future__ import annotations

import csv
import importlib.util
import re

import pytest
import torch
from conftest import CONFIGS, tiny_overrides
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from samparser_monai.engines import latest_checkpoint
from samparser_monai.networks import SamParser, coefficient_state


def _workflow(config_files, run_id="training", workflow_type="train", **override) -> ConfigWorkflow:
    return ConfigWorkflow(
        config_file=[str(CONFIGS / f) for f in config_files],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type=workflow_type,
        run_id=run_id,
        **override,
    )


def _train(tmp_path, dataset, **extra) -> ConfigWorkflow:
    workflow = _workflow(["train.json"], **tiny_overrides(tmp_path, dataset, **extra))
    workflow.initialize()
    assert workflow.check_properties() in (None, [])
    return workflow


def test_one_epoch_saves_only_trainable_state_and_validates(tmp_path, small_dataset):
    workflow = _train(tmp_path, small_dataset)
    workflow.run()
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    assert 0.0 <= evaluator.state.metrics["val_mean_dice"] <= 1.0
    assert 0.0 <= evaluator.state.metrics["val_slice_dice"] <= 1.0
    network = workflow.parser.get_parsed_content("network")
    trainable = {n for n, p in network.named_parameters() if p.requires_grad}
    ckpt_dir = tmp_path / "bundle" / "models"
    best = torch.load(ckpt_dir / "model.pt", weights_only=True)  # a single object: saved as the coefficient state
    latest = torch.load(latest_checkpoint(ckpt_dir), weights_only=True)
    for state in (best, latest["model"]):
        assert set(state["state_dict"]) == trainable, "the checkpoint must hold exactly the trainable tensors"
        assert state["base_sha256"] == network.base_sha256
    assert latest["trainer"]["iteration"] == latest["trainer"]["epoch_length"] == 2 and "optimizer" in latest
    workflow.finalize()


def test_resume_continues_from_the_saved_epoch(tmp_path, small_dataset, capsys):
    first = _train(tmp_path, small_dataset)
    first.run()
    first.finalize()
    assert re.search(r"time per step \(2 steps\): data \d+\.\d ms, step \d+\.\d ms", capsys.readouterr().out)
    resumed = _train(tmp_path, small_dataset, epochs=2, resume=True)
    trainer = resumed.parser.get_parsed_content("train#trainer")
    started = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: started.append(engine.state.epoch))
    resumed.run()
    assert started == [2], "epoch 1 was saved: the resumed run must only train epoch 2"
    assert "time per step (2 steps)" in capsys.readouterr().out, "the timing covers the steps this run did"
    assert trainer.state.epoch == 2
    assert latest_checkpoint(tmp_path / "bundle" / "models").endswith("checkpoint_epoch=2.pt")
    resumed.finalize()


def _evaluate(tmp_path, dataset, **extra) -> list[dict]:
    """Run evaluate.json over the trained bundle; the rows of its metrics.csv."""
    override = tiny_overrides(tmp_path, dataset, **extra)
    workflow = _workflow(["train.json", "evaluate.json"], run_id="evaluating", workflow_type="infer", **override)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    with open(tmp_path / "bundle" / "eval" / "evaluation" / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_evaluate_writes_per_case_metrics_with_the_jitter(tmp_path, small_dataset):
    _train(tmp_path, small_dataset, amp=True).run()  # the AMP switch (a no-op on CPU; autocast on GPUs)
    rows = _evaluate(tmp_path, small_dataset, val_box_jitter=0.05)
    assert {(r["label"], r["label_name"]) for r in rows} == {("1", "head"), ("2", "body")}
    assert len(rows) == 2 and all(r["box_jitter"] == "0.05" for r in rows)
    assert all(0.0 <= float(r["dice"]) <= 1.0 and float(r["hd95"]) >= 0.0 for r in rows)
    assert all(r["prompt"] == "label" for r in rows), "the prompts the numbers were made with travel with them"


@pytest.mark.parametrize("prompt", ["roi", "click3"])
def test_evaluate_with_the_prompts_users_give(tmp_path, small_dataset, prompt):
    _train(tmp_path, small_dataset).run()
    rows = _evaluate(tmp_path, small_dataset, eval_prompt=prompt)
    assert len(rows) == 2 and all(r["prompt"] == prompt for r in rows)
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)


def _root(err: BaseException) -> BaseException:
    """MONAI's config parser wraps errors in RuntimeError; the user's sentence is the root cause in the traceback."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def test_bad_inputs_are_one_sentence(tmp_path, small_dataset, tiny_checkpoint):
    with pytest.raises(RuntimeError) as missing:
        _train(tmp_path, tmp_path / "nowhere").run()
    assert isinstance(_root(missing.value), FileNotFoundError)
    assert "nowhere' does not exist: pass --dataset_dir <folder>" in str(_root(missing.value))

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "dataset.json").write_text('{"training": []}')
    with pytest.raises(RuntimeError) as empty_list:
        _train(tmp_path, empty).run()
    assert "section of" in str(_root(empty_list.value)) and "dataset.json is empty" in str(_root(empty_list.value))

    # a coefficient checkpoint of another base (a tiny SAM from a checkpoint file) must be refused
    foreign = tmp_path / "foreign.pt"
    torch.save(coefficient_state(SamParser("tiny", tiny_checkpoint)), foreign)
    override = tiny_overrides(tmp_path, small_dataset, eval_checkpoint=str(foreign))
    workflow = _workflow(["train.json", "evaluate.json"], run_id="evaluating", workflow_type="infer", **override)
    workflow.initialize()
    with pytest.raises(RuntimeError) as foreign_base:
        workflow.run()
    assert re.search(
        r"was trained on base tiny with sha256 .* build the model from the same base", str(_root(foreign_base.value))
    )


def _oblique_msd(root, n_cases: int = 3):
    """An MSD-layout folder whose volumes are stored permuted and flipped (Orientationd must act, Invertd undo)."""
    import json

    import nibabel as nib
    import numpy as np

    affine = np.array([[0.0, 0.8, 0.0, -20.0], [-1.2, 0.0, 0.0, 35.0], [0.0, 0.0, 2.5, -7.0], [0.0, 0.0, 0.0, 1.0]])
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i in range(n_cases):
        label = np.zeros((30, 24, 12), np.uint8)
        label[8 + i : 15 + i, 4:11, 3:9] = 1
        label[18:24, 12:20, 5:10] = 2
        name = f"case_{i}.nii.gz"
        nib.save(nib.Nifti1Image((label * 0.3 + 0.1).astype(np.float32), affine), str(root / "imagesTr" / name))
        nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "a", "2": "b"}, "training": training}))
    return root, affine


def test_inference_bundle_writes_label_maps_in_the_input_geometry(tmp_path):
    import nibabel as nib
    import numpy as np

    data, affine = _oblique_msd(tmp_path / "data")
    _train(tmp_path, data).run()
    override = {
        k: v for k, v in tiny_overrides(tmp_path, data).items() if k in ("bundle_root", "dataset_dir", "backbone")
    }
    predictions = tmp_path / "bundle" / "eval" / "predictions"
    runtime = "onnxruntime" if importlib.util.find_spec("onnxruntime") else "torch"  # the cpu extra, when installed
    for split, cases in (("validation", 1), ("all", 3)):  # every case of dataset_dir by default
        workflow = _workflow(
            ["inference.json"], run_id="run", workflow_type="infer", val_fraction=0.34, inference_split=split,
            overwrite=True, runtime=runtime, **override,
        )  # fmt: skip
        workflow.initialize()
        workflow.run()
        workflow.finalize()
        summary = list(csv.DictReader((predictions / "summary.csv").read_text().splitlines()))
        assert len(summary) == cases and {row["status"] for row in summary} == {"ok"}, split
    written = sorted(predictions.glob("*_seg.nii.gz"))
    assert len(written) == 3 and not list(predictions.glob(".partial*")), "no temporary file left behind"
    for path in written:
        source = nib.load(data / "imagesTr" / path.name.replace("_seg", ""))
        output = nib.load(path)
        assert output.shape == source.shape and np.allclose(output.affine, affine, atol=1e-5)
        assert set(np.unique(output.get_fdata())) <= {0.0, 1.0, 2.0}


def test_amp_dtype_reaches_the_trainer_and_the_evaluator(tmp_path, small_dataset):
    override = tiny_overrides(tmp_path, small_dataset, amp_dtype="bfloat16")
    workflow = _workflow(["train.json"], **override)
    for engine in ("train#trainer", "validate#evaluator"):
        assert workflow.parser.get_parsed_content(engine).amp_kwargs == {"dtype": torch.bfloat16}, engine


@pytest.mark.parametrize("protocol", ["user", "neighbour"])
def test_training_with_user_like_boxes(tmp_path, small_dataset, protocol):
    workflow = _train(tmp_path, small_dataset, train_box_protocol=protocol)
    dataset = workflow.parser.get_parsed_content("train#dataset")
    assert dataset.context, "the slice dataset carries the neighbouring slices and the 3D box"
    workflow.run()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 2 and torch.isfinite(torch.as_tensor(trainer.state.output[0]["loss"]))
    workflow.finalize()


def _prompts_reaching_the_network(tmp_path, small_dataset, clicks: float, masks: float) -> list[list[str]]:
    """Train 2 steps with these prompt shares; the prompt keywords of each forward, after checking the extra keys,
    the loss and the checkpoint's ``training_prompts``."""
    workflow = _train(tmp_path, small_dataset, train_click_fraction=clicks, train_mask_prompt_fraction=masks)
    expected = {"box": "box", "points": "points", "point_labels": "point_labels"}
    expected.update({"mask_prompt": "mask_prompt"} if masks else {})
    assert workflow.parser.get_parsed_content("train#prepare_batch").extra_keys == expected
    seen = []
    network = workflow.parser.get_parsed_content("network")
    network.register_forward_hook(lambda module, args, kwargs, output: seen.append(sorted(kwargs)), with_kwargs=True)
    workflow.run()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 2 and torch.isfinite(torch.as_tensor(trainer.state.output[0]["loss"]))
    saved = torch.load(tmp_path / "bundle" / "models" / "model.pt", weights_only=True)
    assert saved["training_prompts"] == {"click_fraction": clicks, "mask_prompt_fraction": masks}
    workflow.finalize()
    return seen


def test_training_with_clicks(tmp_path, small_dataset):
    """train_click_fraction: samples carry clicks, the trainer passes them to the network, and it trains."""
    seen = _prompts_reaching_the_network(tmp_path, small_dataset, clicks=1.0, masks=0.0)
    assert seen[:2] == [["box", "point_labels", "points"]] * 2, "box, points and point labels reach the network"


def test_training_with_clicks_and_mask_prompts_together(tmp_path, small_dataset):
    """Both knobs at once: every sample reaches the network with its box, clicks and mask prompt."""
    seen = _prompts_reaching_the_network(tmp_path, small_dataset, clicks=0.5, masks=0.5)
    assert seen[:2] == [["box", "mask_prompt", "point_labels", "points"]] * 2


def test_training_with_mask_prompts(tmp_path, small_dataset):
    """train_mask_prompt_fraction: neighbours' masks reach the network as mask prompts, and the checkpoint says so."""
    workflow = _train(tmp_path, small_dataset, train_click_fraction=0.0, train_mask_prompt_fraction=1.0)
    prompts = []
    network = workflow.parser.get_parsed_content("network")
    network.register_forward_hook(lambda module, a, kw, out: prompts.append(kw.get("mask_prompt")), with_kwargs=True)
    workflow.run()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 2 and torch.isfinite(torch.as_tensor(trainer.state.output[0]["loss"]))
    given = [p for p in prompts[:2] if p is not None]
    assert len(given) == 2 and given[0].shape[-2:] == (network.image_size, network.image_size)
    assert any(bool((p[:, 0] > 0).any()) for p in given), "a neighbour's mask is passed as the prompt"
    saved = torch.load(tmp_path / "bundle" / "models" / "model.pt", weights_only=True)
    assert saved["training_prompts"] == {"click_fraction": 0.0, "mask_prompt_fraction": 1.0}
    workflow.finalize()
