# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Benchmark harness used by ``scripts/``: methods trained and scored through the bundle side by side."""
