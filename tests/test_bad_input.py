# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Bad input, one row each: the exit status, the one sentence, that the batch went on, and that no earlier file
changed. The README's "What happens with bad input" lists the same rows."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from samparser_monai import infer
from samparser_monai.engines.prompt_engine import ObjectPrompt, PromptResult
from samparser_monai.engines.volume_inference import VolumeSegmenter
from samparser_monai.errors import root_message
from samparser_monai.networks import SamParser, coefficient_state

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundle" / "configs"
AFFINE = np.diag([0.9, 1.1, 2.0, 1.0])


def _volume(folder: Path, name: str, with_label: bool = True, nan: int = 0) -> Path:
    """A 30 x 24 x 12 volume with two objects (labels 1 and 3); ``nan`` voxels set to NaN."""
    folder.mkdir(parents=True, exist_ok=True)
    label = np.zeros((30, 24, 12), np.uint8)
    label[8:15, 4:11, 3:9] = 1
    label[18:24, 12:20, 5:10] = 3
    image = (label * 0.3 + 0.1).astype(np.float32)
    image.reshape(-1)[:nan] = np.nan
    nib.save(nib.Nifti1Image(image, AFFINE), str(folder / f"{name}.nii.gz"))
    if with_label:
        (folder / "labels").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(label, AFFINE), str(folder / "labels" / f"{name}.nii.gz"))
    return folder / f"{name}.nii.gz"


def _snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` (empty when it does not exist)."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def _summary(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv") as handle:
        return {row["case"]: row for row in csv.DictReader(handle)}


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = infer.main([*args, "--backbone", "tiny"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def data(tmp_path) -> Path:
    """Two good labelled cases in ``data/``."""
    for name in ("a", "b"):
        _volume(tmp_path / "data", name)
    return tmp_path / "data"


def _cases(data: Path) -> list[str]:
    return [str(data / "a.nii.gz"), str(data / "b.nii.gz"), "--labels", str(data / "labels")]


# --- samparser-infer: output folders ---------------------------------------------------------------------------------


def test_rerun_into_a_used_folder_is_refused_and_changes_nothing(capsys, data, tmp_path):
    out = tmp_path / "out"
    assert _run(capsys, *_cases(data), "--output-dir", str(out))[0] == 0
    before = _snapshot(out)
    code, _, err = _run(capsys, *_cases(data), "--output-dir", str(out))
    assert code == 1
    assert "already holds results of an earlier run (a_seg.nii.gz, b_seg.nii.gz, metrics.csv and 1 more)" in err
    assert "pass --overwrite to replace them" in err
    assert _snapshot(out) == before


def test_overwrite_removes_the_label_map_of_a_case_that_now_fails(capsys, data, tmp_path):
    out = tmp_path / "out"
    assert _run(capsys, *_cases(data), "--output-dir", str(out))[0] == 0
    (data / "labels" / "b.nii.gz").unlink()  # b now has no reference to draw label boxes from
    code, stdout, _ = _run(capsys, *_cases(data), "--output-dir", str(out), "--overwrite")
    assert code == 1
    summary = _summary(out)
    assert summary["a"]["status"] == "ok" and (out / "a_seg.nii.gz").is_file(), "the batch went on"
    assert summary["b"]["status"] == "skipped" and "label map from an earlier run was removed" in summary["b"]["reason"]
    assert not (out / "b_seg.nii.gz").exists(), "no older segmentation that looks current"
    assert "skipped b: no reference label map" in stdout


def test_metrics_of_an_earlier_run_never_sit_beside_new_label_maps(capsys, data, tmp_path):
    out = tmp_path / "out"
    assert _run(capsys, *_cases(data), "--output-dir", str(out))[0] == 0 and (out / "metrics.csv").is_file()
    entry = [{"label": 1, "box": [8, 4, 3, 14, 10, 8], "space": "voxel"}]
    box = {"a": entry, "b": entry}
    (tmp_path / "boxes.json").write_text(json.dumps(box))
    images = [str(data / "a.nii.gz"), str(data / "b.nii.gz")]  # no --labels: nothing to score against
    args = ["--prompt", "boxes", "--boxes", str(tmp_path / "boxes.json"), "--output-dir", str(out), "--overwrite"]
    code, stdout, err = _run(capsys, *images, *args)
    assert code == 0, stdout + err
    assert not (out / "metrics.csv").exists() and set(_summary(out)) == {"a", "b"}


@pytest.mark.parametrize(
    ("checkpoint", "sentence"),
    [
        ("missing.pt", "does not exist; pass the model.pt"),
        ("truncated.pt", "could not be read: it is truncated or corrupt (its zip archive cannot be read); pass"),
        ("pickle.pt", "could not be read: it holds Python objects besides tensors, which a safe (weights-only) load"),
    ],
)
def test_a_checkpoint_error_is_one_sentence_and_creates_no_output_folder(capsys, data, tmp_path, checkpoint, sentence):
    torch.save({"x": torch.zeros(100)}, tmp_path / "full.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:300])
    torch.save({"x": Path("not a tensor")}, tmp_path / "pickle.pt")
    out = tmp_path / "out"
    code, _, err = _run(capsys, *_cases(data), "--output-dir", str(out), "--checkpoint", str(tmp_path / checkpoint))
    assert code == 1 and sentence in err
    assert len(err.strip().splitlines()) == 1 and err.strip().endswith(".")
    assert not out.exists(), "nothing is created when the run fails before its first case"


# --- samparser-infer: inputs -----------------------------------------------------------------------------------------


def test_a_label_the_engine_found_nothing_for_is_a_warning_of_the_case_not_silently_missing(tmp_path, monkeypatch):
    """The case is written (label 1 was found) and its summary row says label 2 is empty, and why."""
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 6), np.float32), np.eye(4)), str(tmp_path / "a.nii.gz"))
    segmenter = VolumeSegmenter(SamParser(backbone="tiny").eval(), str(tmp_path / "out"), intensity="unit")
    objects = [ObjectPrompt(1, 2, torch.tensor([2, 2, 5, 5])), ObjectPrompt(2, 3, torch.tensor([1, 1, 3, 3]))]
    labels = torch.zeros(8, 8, 6, dtype=torch.int64)
    labels[2:5, 2:5, 1:4] = 1
    found = PromptResult(labels, slices=[[1, 2, 3], []], stops=[["area", "roi"], ["empty"]])
    monkeypatch.setattr(segmenter.engine, "segment", lambda image, given, embeddings=None: found)
    monkeypatch.setattr("samparser_monai.engines.volume_inference.json_object_prompts", lambda *args: objects)
    entry = [{"label": 1, "box": [2, 2, 2, 5, 5, 2], "space": "voxel"}, {"label": 2, "box": [1, 1, 3, 3, 3, 3]}]
    outcome = segmenter.segment({"image": str(tmp_path / "a.nii.gz")}, "key", entry)
    assert outcome.status == "ok", outcome.reason
    assert outcome.propagation.startswith("label 1: 3 slices (area, roi); label 2: 0 slices (empty)")
    assert "label 2 is empty in the result: the model found nothing at its prompt" in outcome.warning


def test_nan_voxels_are_replaced_and_reported(capsys, tmp_path):
    data = tmp_path / "data"
    _volume(data, "nan", nan=25)
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, str(data / "nan.nii.gz"), "--labels", str(data / "labels"), "--output-dir", str(out))
    assert code == 0
    row = _summary(out)["nan"]
    assert (
        row["status"] == "ok"
        and row["warning"] == "25 NaN or infinite voxels were replaced by the image's finite range"
    )
    assert "warning nan: 25 NaN or infinite voxels were replaced" in stdout


def test_dicom_flag_with_a_file_names_the_fix(capsys, data, tmp_path):
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, str(data / "a.nii.gz"), "--dicom", "--output-dir", str(out))
    assert code == 1
    reason = _summary(out)["a"]["reason"]
    assert reason.startswith("'") and "is a file, but --dicom reads folders of DICOM series" in reason
    assert "leave --dicom out for NIfTI" in reason and "skipped a:" in stdout


def test_two_inputs_with_one_case_id_never_overwrite_each_other(capsys, data, tmp_path):
    other = tmp_path / "other"
    _volume(other, "a", with_label=False)
    out = tmp_path / "out"
    code, _, _ = _run(capsys, str(data / "a.nii.gz"), str(other / "a.nii.gz"), "--labels", str(data / "labels"),
                      "--output-dir", str(out))  # fmt: skip
    assert code == 1
    with open(out / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["status"] for r in rows] == ["ok", "skipped"]
    assert "has the same case id, and its label map 'a_seg.nii.gz' would be overwritten" in rows[1]["reason"]


@pytest.mark.parametrize(
    ("write", "sentence"),
    [
        (lambda p: p.write_bytes(b"\x1f\x8b not a volume"), ""),  # corrupt: the reader's own sentence
        (lambda p: nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 2), np.float32), AFFINE), str(p)), "expected one 3D"),
        (lambda p: None, "No such file"),  # listed but missing
    ],
    ids=["corrupt", "4d", "missing"],
)
def test_an_unreadable_case_is_skipped_with_its_reason_and_the_batch_goes_on(capsys, data, tmp_path, write, sentence):
    bad = data / "bad.nii.gz"
    write(bad)
    _volume(tmp_path / "labelled", "bad")  # a good reference: the image is what fails
    (tmp_path / "labelled" / "labels" / "bad.nii.gz").rename(data / "labels" / "bad.nii.gz")
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, str(data / "a.nii.gz"), str(bad), "--labels", str(data / "labels"),
                           "--output-dir", str(out))  # fmt: skip
    summary = _summary(out)
    assert code == 1 and summary["a"]["status"] == "ok" and summary["bad"]["status"] == "skipped"
    assert summary["bad"]["reason"] and sentence in summary["bad"]["reason"] and "skipped bad:" in stdout
    assert not (out / "bad_seg.nii.gz").exists()


def test_a_label_map_on_another_grid_is_skipped(capsys, data, tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((30, 24, 11), np.uint8), AFFINE), str(data / "labels" / "b.nii.gz"))
    out = tmp_path / "out"
    code, _, _ = _run(capsys, *_cases(data), "--output-dir", str(out))
    assert code == 1 and _summary(out)["a"]["status"] == "ok"
    assert "differ in shape ((30, 24, 12) vs (30, 24, 11))" in _summary(out)["b"]["reason"]


def test_a_prompt_label_that_is_not_a_positive_integer_is_refused_before_any_work(capsys, data, tmp_path):
    (tmp_path / "boxes.json").write_text(
        json.dumps({"a": [{"label": -1, "box": [8, 4, 3, 14, 10, 8], "space": "voxel"}]})
    )
    out = tmp_path / "out"
    code, _, err = _run(capsys, str(data / "a.nii.gz"), "--prompt", "roi", "--boxes", str(tmp_path / "boxes.json"),
                        "--output-dir", str(out))  # fmt: skip
    assert code == 1 and "positive integer" in err and not out.exists()


# --- the bundle ------------------------------------------------------------------------------------------------------


def _bundle_inference(tmp_path: Path, dataset: Path, **override):
    from monai.bundle import ConfigWorkflow

    models = tmp_path / "bundle" / "models"
    models.mkdir(parents=True, exist_ok=True)
    if not (models / "model.pt").exists():
        torch.save(coefficient_state(SamParser("tiny", coefficients="paper", trainable="parser")), models / "model.pt")
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        workflow_type="infer",
        run_id="run",
        bundle_root=str(tmp_path / "bundle"),
        dataset_dir=str(dataset),
        backbone="tiny",
        **override,
    )
    workflow.initialize()
    return workflow


def _msd(folder: Path, names: list[str]) -> Path:
    """An MSD-layout dataset.json over ``names`` (files written by :func:`_volume`; a missing one stays missing)."""
    training = [{"image": f"./{n}.nii.gz", "label": f"./labels/{n}.nii.gz"} for n in names]
    (folder / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "x", "3": "y"}, "training": training}))
    return folder


def test_bundle_inference_skips_a_missing_case_and_exits_non_zero_at_the_end(data, tmp_path):
    dataset = _msd(data, ["a", "gone", "b"])
    workflow = _bundle_inference(tmp_path, dataset)
    with pytest.raises(SystemExit, match=r"error: 1 case of 3 skipped \(the first: gone, .*No such file.*summary.csv"):
        workflow.run()
    out = tmp_path / "bundle" / "eval" / "predictions"
    summary = _summary(out)
    assert [summary[c]["status"] for c in ("a", "gone", "b")] == ["ok", "skipped", "ok"], "the batch went on"
    assert (out / "a_seg.nii.gz").is_file() and (out / "b_seg.nii.gz").is_file()


def test_bundle_inference_with_a_prompt_file_lists_case_ids_that_match_no_input(data, tmp_path):
    dataset = _msd(data, ["a", "b"])
    entry = [{"label": 1, "box": [8, 4, 3, 14, 10, 8], "space": "voxel"}]
    (tmp_path / "rois.json").write_text(json.dumps({"a": entry, "typo": entry}))
    workflow = _bundle_inference(tmp_path, dataset, prompt="roi", prompt_file=str(tmp_path / "rois.json"))
    with pytest.raises(SystemExit, match=r"1 case of 2 skipped \(the first: b, the prompt file has no prompt for it\)"):
        workflow.run()
    summary = _summary(tmp_path / "bundle" / "eval" / "predictions")
    assert summary["a"]["status"] == "ok" and summary["typo"]["status"] == "unmatched prompt"


def test_bundle_inference_refuses_a_used_output_folder_unless_overwrite(data, tmp_path):
    dataset = _msd(data, ["a", "b"])
    _bundle_inference(tmp_path, dataset).run()
    out = tmp_path / "bundle" / "eval" / "predictions"
    before = _snapshot(out)
    with pytest.raises(Exception) as raised:  # noqa: PT011 - MONAI's config parser wraps it
        _bundle_inference(tmp_path, dataset)
    assert "already holds results of an earlier run" in root_message(raised.value)
    assert "pass --overwrite true to replace them" in root_message(raised.value)
    assert _snapshot(out) == before
    _bundle_inference(tmp_path, dataset, overwrite=True).run()
    assert set(_summary(out)) == {"a", "b"}


def test_bundle_inference_without_a_checkpoint_says_how_to_get_one(data, tmp_path):
    dataset = _msd(data, ["a", "b"])
    with pytest.raises(Exception) as raised:  # noqa: PT011 - MONAI's config parser wraps it
        _bundle_inference(tmp_path, dataset, ckpt_path=str(tmp_path / "nowhere.pt"))
    assert root_message(raised.value).startswith(f"Checkpoint '{tmp_path / 'nowhere.pt'}' does not exist; train first")
    assert not (tmp_path / "bundle" / "eval").exists()


@pytest.mark.parametrize(
    ("override", "sentence"),
    [
        (["--dataset_dir", "{tmp}/nowhere"], "error: dataset_dir '{tmp}/nowhere' does not exist: pass --dataset_dir"),
        (
            ["--dataset_dir", "demo", "--coefficient_parametrization", "scaled"],
            "error: coefficient_parametrization must",
        ),
    ],
    ids=["missing-folder", "bad-value"],
)
def test_bundle_training_errors_end_with_one_sentence(tmp_path, override, sentence):
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--meta_file", str(CONFIGS / "metadata.json"),
               "--config_file", str(CONFIGS / "train.json"), "--bundle_root", str(tmp_path / "bundle"),
               "--backbone", "tiny", *(a.format(tmp=tmp_path) for a in override)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(sentence.format(tmp=tmp_path)), result.stderr[-2000:]


# --- MONAI Label -----------------------------------------------------------------------------------------------------


def test_label_server_answers_params_that_are_not_json_with_400():
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from samparser_monai.label.http_errors import bad_params_response

    app = fastapi.FastAPI()

    @app.post("/infer")
    def endpoint(params: str = fastapi.Form("{}")) -> dict:  # parses as MONAI Label's endpoint does
        return json.loads(params)

    app.add_exception_handler(json.JSONDecodeError, bad_params_response)
    client = TestClient(app)
    response = client.post("/infer", data={"params": "{roi: [1, 2"})
    assert response.status_code == 400
    assert response.json()["detail"].startswith("The request's params are not valid JSON (Expecting property name")
    assert client.post("/infer", data={"params": '{"roi": [1]}'}).json() == {"roi": [1]}, "the server goes on"
