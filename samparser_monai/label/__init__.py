# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""MONAI Label app: 3D masks from an ROI or clicks in 3D Slicer, and fine-tuning from the corrected labels.

Start it with ``samparser-label --studies <dir>`` (or ``monailabel start_server --app
samparser_monai/label/server_app ...``); it needs the ``label`` extra: ``pip install 'samparser-monai[label]'``.
Modules that talk to MONAI Label (``app``, ``infer``, ``train``) import it; the others (``config``, ``prompts``,
``geometry``, ``refine``, ``model``, ``training``) work without it.
"""

__all__: list[str] = []
