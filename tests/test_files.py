# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""staged_file: readers see the old file or the complete new one; a failed write leaves the old one and no trace."""

from __future__ import annotations

import os
import stat

import pytest

from samparser_monai.files import staged_file


def test_a_complete_write_replaces_the_target_with_the_users_permissions(tmp_path):
    target = tmp_path / "sub" / "summary.csv"
    old_umask = os.umask(0o022)
    try:
        with staged_file(target) as partial:
            assert os.path.dirname(partial) == str(target.parent) and os.path.basename(partial).startswith(".partial-")
            assert not target.exists(), "the target appears only when the writer is done"
            with open(partial, "x") as handle:
                handle.write("a,b\n")
    finally:
        os.umask(old_umask)
    assert target.read_text() == "a,b\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644, "the umask's permissions, not mkstemp's 0600"
    assert [p.name for p in target.parent.iterdir()] == ["summary.csv"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "model.pt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), staged_file(target) as partial:
        with open(partial, "w") as handle:
            handle.write("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_a_writer_that_appends_a_suffix(tmp_path):
    target = tmp_path / "case_seg.nii.gz"
    with staged_file(target, suffix=".nii.gz") as stem:
        assert not stem.endswith(".nii.gz")
        with open(stem + ".nii.gz", "w") as handle:  # as SaveImage does with the name it is given
            handle.write("image")
    assert target.read_text() == "image" and [p.name for p in tmp_path.iterdir()] == ["case_seg.nii.gz"]
