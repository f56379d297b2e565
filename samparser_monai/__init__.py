# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""SAM-PARSER for MONAI: fine-tune Segment Anything through the SVD coefficients of its image encoder."""

__version__ = "0.1.0"
