# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""samparser-label as users run it: help, settings checked before anything starts, the server command it runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from samparser_monai.label.cli import main
from samparser_monai.label.config import LabelConfig


def _cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "samparser_monai.label.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_help_names_the_defaults():
    result = _cli("--help")
    assert result.returncode == 0
    assert "default 127.0.0.1" in result.stdout and "lite_medsam (default" in result.stdout
    assert "click_box_mm" in result.stdout, "the --conf keys are listed"


def test_dry_run_prints_the_monailabel_command_on_localhost(tmp_path):
    pytest.importorskip("monailabel")
    studies = tmp_path / "studies"
    studies.mkdir()
    result = _cli("--studies", str(studies), "--preset", "parser_paper", "--conf", "click_box_mm", "30", "--dry-run")
    assert result.returncode == 0, result.stderr
    command = result.stdout.strip().split()
    assert command[1:4] == ["-m", "monailabel.main", "start_server"]
    assert command[command.index("--host") + 1] == "127.0.0.1"
    app_dir = studies / ".samparser-label"
    assert command[command.index("--app") + 1] == str(app_dir.resolve()) and (app_dir / "main.py").is_file()
    assert "click_box_mm 30" in result.stdout and "preset parser_paper" in result.stdout


@pytest.mark.parametrize(
    ("args", "sentence"),
    [
        (["--backbone", "vit_z"], "Unknown backbone 'vit_z' in --conf backbone"),
        (["--coefficients", "nowhere.pt"], "--conf coefficients 'nowhere.pt' does not exist"),
        (["--conf", "click_box_mm", "big"], "--conf click_box_mm must be a number, got 'big'"),
        (["--intensity", "ct_teeth"], "Unknown intensity preset 'ct_teeth'"),
        (["--conf", "retain_host_memory", "maybe"], "--conf retain_host_memory must be true or false, got 'maybe'"),
    ],
)
def test_bad_settings_stop_before_the_server_starts(tmp_path, capsys, args, sentence):
    pytest.importorskip("monailabel")
    assert main(["--studies", str(tmp_path), *args, "--dry-run"]) == 1
    captured = capsys.readouterr()
    assert sentence in captured.err and captured.err.count("\n") == 1, "one line, no traceback"
    assert captured.out == "", "no server command"


def test_missing_studies_folder_is_one_line(tmp_path, capsys):
    pytest.importorskip("monailabel")
    assert main(["--studies", str(tmp_path / "none"), "--dry-run"]) == 1
    assert "studies folder" in capsys.readouterr().err


def test_a_file_that_is_no_coefficient_checkpoint_is_refused(tmp_path):
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        LabelConfig.from_conf({"coefficients": str(bogus)})
    assert LabelConfig.from_conf({"labels": "head, body", "axis": "1"}).labels == ("head", "body")


def test_retain_host_memory_reads_true_or_false():
    assert LabelConfig.from_conf({}).retain_host_memory is True, "on by default"
    assert LabelConfig.from_conf({"retain_host_memory": "False"}).retain_host_memory is False
    assert LabelConfig.from_conf({"retain_host_memory": "yes"}).retain_host_memory is True
