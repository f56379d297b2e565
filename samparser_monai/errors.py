# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Error helpers: the user's one sentence is the root of an exception chain that MONAI's transforms wrap."""

from __future__ import annotations

import sys
import zipfile
from types import TracebackType

__all__ = ["report_user_errors", "root_cause", "root_message", "unreadable_reason"]


def root_cause(err: BaseException) -> BaseException:
    """The first exception of an explicit chain (``raise ... from``, as MONAI wraps transform and config errors)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def root_message(err: BaseException) -> str:
    """The first line of the root cause's message (its type name when it has none)."""
    text = str(root_cause(err)).strip()
    return text.splitlines()[0] if text else type(root_cause(err)).__name__


def unreadable_reason(err: BaseException) -> str:
    """Why ``torch.load`` could not read a file, as one complete clause (torch's own messages run to paragraphs).

    Example: ``f"Checkpoint '{path}' could not be read: {unreadable_reason(err)}."``
    """
    text = str(err)
    if "Weights only load failed" in text:
        return "it holds Python objects besides tensors, which a safe (weights-only) load refuses to run"
    if isinstance(err, (EOFError, zipfile.BadZipFile)) or "zip archive" in text or "central directory" in text:
        return "it is truncated or corrupt (its zip archive cannot be read)"
    return f"it is not a PyTorch file (torch.load stopped with {type(err).__name__})"


def _excepthook(kind: type[BaseException], value: BaseException, traceback: TracebackType | None) -> None:
    _excepthook.previous(kind, value, traceback)  # type: ignore[attr-defined]
    if not issubclass(kind, KeyboardInterrupt):
        print(f"error: {root_message(value)}", file=sys.stderr, flush=True)


def report_user_errors() -> None:
    """End every uncaught error of this process with its one sentence, as the last line (``error: <sentence>``).

    The bundle configs call it first in ``initialize``: MONAI's config parser wraps an error (a missing folder, a bad
    config value) in several layers, and its traceback runs to a hundred lines. The traceback is still printed, for
    whoever debugs; the root cause's message follows it, where a user reads first. Calling it twice is harmless.
    """
    if sys.excepthook is not _excepthook:
        _excepthook.previous = sys.excepthook  # type: ignore[attr-defined]
        sys.excepthook = _excepthook
