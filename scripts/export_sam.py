# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Export a SAM-PARSER coefficient checkpoint as a stock SAM checkpoint (and TorchScript): ``samparser-export``.

Example::

    python scripts/export_sam.py --checkpoint bundle/models/model.pt --backbone vit_b \
        --base-checkpoint sam_vit_b_01ec64.pth --output-dir exported --torchscript

See ``python scripts/export_sam.py --help`` and :mod:`samparser_monai.export`.
"""

from __future__ import annotations

import sys

from samparser_monai.export import main

if __name__ == "__main__":
    sys.exit(main())
