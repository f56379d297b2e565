# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""The MONAI Label names this package uses, imported in one place with one clear error when it is missing."""

from __future__ import annotations

try:
    from fastapi import HTTPException
    from monailabel.interfaces.app import MONAILabelApp
    from monailabel.interfaces.datastore import Datastore
    from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
    from monailabel.interfaces.tasks.train import TrainTask
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"The MONAI Label app needs monailabel ({err.name or err} is missing): pip install 'samparser-monai[label]'."
    ) from err

__all__ = [
    "Datastore",
    "HTTPException",
    "InferTask",
    "InferType",
    "MONAILabelApp",
    "TrainTask",
]
