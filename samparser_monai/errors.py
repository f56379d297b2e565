# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Error helpers: the user's one sentence is the root of an exception chain that MONAI's transforms wrap."""

from __future__ import annotations

__all__ = ["root_cause", "root_message"]


def root_cause(err: BaseException) -> BaseException:
    """The first exception of an explicit chain (``raise ... from``, as MONAI wraps transform and config errors)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def root_message(err: BaseException) -> str:
    """The first line of the root cause's message (its type name when it has none)."""
    text = str(root_cause(err)).strip()
    return text.splitlines()[0] if text else type(root_cause(err)).__name__
