# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""MONAI Label app entry point: MONAI Label loads this file and serves the MONAILabelApp subclass it finds.

monailabel start_server --app <this folder> --studies <dir> --conf backbone lite_medsam --conf preset parser_paper
"""

from samparser_monai.label.app import SamParserLabelApp

__all__ = ["SamParserLabelApp"]
