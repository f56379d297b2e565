# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Batch NIfTI/DICOM inference with box prompts: a thin wrapper of ``samparser-infer`` (samparser_monai.infer)."""

import sys

from samparser_monai.infer import main

if __name__ == "__main__":
    sys.exit(main())
