# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""The MONAI Label app folder: ``monailabel start_server --app <this folder> --studies <dir>`` (see ``main.py``).

MONAI Label writes ``model/``, ``logs/``, ``lib/`` and ``bin/`` into the app folder; ``samparser-label`` therefore
starts from a copy of it in a writable place (:func:`samparser_monai.label.cli.prepare_app_dir`).
"""

from pathlib import Path

#: This folder, to pass as ``--app``.
APP_DIR = Path(__file__).resolve().parent

__all__ = ["APP_DIR"]
