# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Write a result file so that readers see the old file or the complete new one, never a part.

Every file a user or another process may read while it is written (label maps, CSV summaries, the MONAI Label
model, exported checkpoints, the ONNX cache) goes through :func:`staged_file`: the writer fills a hidden file
beside the target (same folder, so the rename is atomic on POSIX), which replaces the target only when the writer
returned; on any error the hidden file is removed and the target is left as it was. The hidden file is created by
the writer itself, so it gets the permissions of any other file the user writes (their umask), not ``mkstemp``'s
0600.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["staged_file", "staging_path"]

#: the prefix of every staged file, so a folder listing (or a test) can tell them apart
STAGING_PREFIX = ".partial-"


def staging_path(target: str | os.PathLike) -> Path:
    """A fresh hidden name beside ``target``: ``.partial-<random>-<target name>``."""
    target = Path(target)
    return target.with_name(f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}-{target.name}")


@contextmanager
def staged_file(target: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a hidden path to write; when the block ends without error it replaces ``target``.

    Args:
        target: the file to write; its folder is created if needed.
        suffix: what the writer appends to the path it is given (``SaveImage`` adds ``.nii.gz``); the yielded
            path lacks it and the written file ``path + suffix`` is the one renamed.

    Example::

        with staged_file("out/summary.csv") as partial:
            Path(partial).write_text(text)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stem = staging_path(target.with_name(target.name.removesuffix(suffix) if suffix else target.name))
    written = Path(f"{stem}{suffix}")
    try:
        yield os.fspath(stem)
        os.replace(written, target)
    finally:
        written.unlink(missing_ok=True)
