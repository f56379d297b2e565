# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""The app's training and model pieces without a server: options, dataset links, publishing, reloading."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from samparser_monai.data.datalists import folder_datalist
from samparser_monai.label.config import LabelConfig
from samparser_monai.label.model import LiveModel
from samparser_monai.label.training import fine_tune, link_dataset, publish_checkpoint, train_options
from samparser_monai.networks import SamParser, coefficient_state

TINY = LabelConfig(backbone="tiny", device="cpu")


def test_options_are_typed_and_a_bad_one_is_one_sentence():
    options = train_options({"epochs": "3", "learning_rate": "0.001", "model": "samparser"})
    assert options["epochs"] == 3 and options["learning_rate"] == 0.001 and "model" not in options
    with pytest.raises(ValueError, match="Training option epochs must be a int, got 'many'"):
        train_options({"epochs": "many"})
    with pytest.raises(ValueError, match="Training option train_click_fraction must be a share from 0 to 1, got '2'"):
        train_options({"train_click_fraction": "2"})
    assert train_options({"train_click_fraction": "0.5"})["train_click_fraction"] == 0.5, "a click model from Slicer"


def test_option_defaults_are_the_bundles():
    """The app trains what the bundle trains unless a request says otherwise (the training prompts above all)."""
    bundle = json.loads((Path(__file__).resolve().parents[2] / "bundle" / "configs" / "train.json").read_text())
    for key in ("train_click_fraction", "train_mask_prompt_fraction", "learning_rate", "coefficient_learning_rate"):
        assert train_options({})[key] == bundle[key], key


def test_studies_become_a_folders_dataset_paired_by_case(tmp_path):
    items = []
    for case in ("a", "b"):
        (tmp_path / "studies" / "labels" / "final").mkdir(parents=True, exist_ok=True)
        image, label = (
            tmp_path / "studies" / f"{case}.nii.gz",
            tmp_path / "studies" / "labels" / "final" / f"{case}.nrrd",
        )
        image.write_bytes(b"image")
        label.write_bytes(b"label")
        items.append({"image": str(image), "label": str(label)})
    folder = link_dataset(items, tmp_path / "dataset")
    pairs = folder_datalist(str(folder / "images" / "*"), str(folder / "labels" / "*"))
    assert [(p["case"], Path(p["label"]).name) for p in pairs] == [("a", "a.nrrd"), ("b", "b.nrrd")]
    assert Path(pairs[0]["image"]).read_bytes() == b"image"


def test_training_refuses_too_few_studies_and_a_missing_bundle(tmp_path):
    item = {"image": "a.nii.gz", "label": "a_label.nii.gz"}
    with pytest.raises(ValueError, match="at least 2 studies with a final label; 1 found"):
        fine_tune([item], TINY, tmp_path)
    elsewhere = LabelConfig(backbone="tiny", repo_root=tmp_path)
    with pytest.raises(FileNotFoundError, match="pass --conf repo_root"):
        fine_tune([item, item], elsewhere, tmp_path)


def test_publishing_is_atomic_and_only_takes_coefficient_states(tmp_path):
    source = tmp_path / "checkpoint_epoch=1.pt"
    torch.save({"model": coefficient_state(SamParser("tiny")), "optimizer": {}}, source)
    target = publish_checkpoint(source, tmp_path / "app" / "model.pt")
    assert torch.load(target, weights_only=True)["backbone"] == "tiny"
    assert [p.name for p in target.parent.iterdir()] == ["model.pt"], "no partial file left behind"
    (tmp_path / "other.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        publish_checkpoint(tmp_path / "other.pt", target)


def test_the_served_model_reloads_when_the_checkpoint_changes(tmp_path):
    path = tmp_path / "model.pt"
    served = LiveModel(TINY, lambda: path if path.is_file() else None)
    stock, checkpoint = served.current()
    assert checkpoint is None and served.current()[0] is stock, "built once"

    trained = SamParser("tiny")
    with torch.no_grad():
        trained.mask_decoder.iou_prediction_head.layers[0].weight.add_(1.0)
    torch.save(coefficient_state(trained), path)
    first, checkpoint = served.current()
    assert checkpoint == str(path) and first is not stock
    weight = "mask_decoder.iou_prediction_head.layers.0.weight"
    assert torch.equal(first.state_dict()[weight], trained.state_dict()[weight])

    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert served.current()[0] is not first, "a new modification time means a new model"


@pytest.mark.parametrize("parametrization", ["additive", "relative"])
def test_training_from_a_served_checkpoint_keeps_its_parametrization(tmp_path, parametrization: str):
    """A served checkpoint trains on in the parametrization it was trained with, whatever the bundle's default, with
    the coefficients in their own optimizer group: an additive one even where it holds a value the relative form
    cannot represent (a non-positive singular value)."""
    from samparser_monai.data import make_demo_dataset
    from samparser_monai.data.datalists import msd_datalist

    data = make_demo_dataset(tmp_path / "Task00_Demo", n_cases=3, shape=(32, 36, 10), seed=1)
    model = SamParser("tiny", coefficient_parametrization=parametrization)
    if parametrization == "additive":
        with torch.no_grad():
            next(iter(model.image_encoder.neck.modules()))[0].coefficients[-1] = -0.5
    served = tmp_path / "served.pt"
    torch.save(coefficient_state(model), served)
    items = [{"image": i["image"], "label": i["label"]} for i in msd_datalist(data)]
    options = {"epochs": 1, "samples_per_epoch": 2, "batch_size": 2, "coefficient_learning_rate": 0.01}
    result = fine_tune(items, TINY, tmp_path / "run", options=options, start_from=served)
    state = torch.load(result["checkpoint"], weights_only=True)
    state = state.get("model", state)
    assert state["coefficient_parametrization"] == parametrization
    assert state["coefficient_movement"]["neck"]["median"] > 0.005, "0.01 a step moves the coefficients"
    assert result["options"]["coefficient_learning_rate"] == 0.01
