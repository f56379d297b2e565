# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""The README's two set-up commands stay true: CI runs the same test command, and the main job runs (shortened)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from samparser_monai import demo

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = _commands()
    assert len(commands) == 2, commands
    install, test = commands
    assert "torch==2.14.1 torchvision==0.29.1" in install
    assert "python -m monai.bundle run training --meta_file bundle/configs/metadata.json" in install
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci.splitlines()
    extras = re.search(r'pip install -e "(\.\[[^\]]+\])"', install).group(1)
    assert f'pip install --quiet -e "{extras}"' in ci, "CI installs the extras the README installs"


@pytest.mark.slow
def test_main_command_runs_shortened(tmp_path, capsys):
    assert demo.main(["--steps", "1", "--batch-size", "1", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "image_encoder (coefficients)" in out and "held-out demo image Dice" in out
    assert (tmp_path / "coefficients.pt").stat().st_size > 0


def test_demo_has_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0
    assert "--steps" in capsys.readouterr().out
