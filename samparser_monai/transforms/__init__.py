# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Transforms: intensity presets to [0, 1], box, click and mask prompts from label maps, SAM's resize + pad."""

from samparser_monai.transforms.box_prompts import (
    BOX_MODES,
    USER_BOXES,
    BoxPromptd,
    UserBoxPromptd,
    grow_box,
    jitter_box,
    mask_to_box,
)
from samparser_monai.transforms.checks import CheckVolumePaird, ReplaceNonFinited
from samparser_monai.transforms.click_prompts import NO_CLICK, ClickPromptd
from samparser_monai.transforms.intensity import (
    CT_WINDOWS,
    INTENSITY_PRESETS,
    CTWindowd,
    GreyToRGBd,
    IntensityPresetd,
    PercentileNormalized,
)
from samparser_monai.transforms.mask_prompts import NO_MASK, MaskPromptd, morph_mask, shift_mask
from samparser_monai.transforms.pipelines import (
    BOX_PROTOCOLS,
    image_2d_transforms,
    slice_transforms,
    volume_transforms,
)
from samparser_monai.transforms.spatial import (
    RESIZE_MODES,
    ResizeLongestPadd,
    resize_longest_pad,
    resized_size,
    scale_box,
    undo_resize_longest_pad,
)

__all__ = [
    "BOX_MODES",
    "BOX_PROTOCOLS",
    "USER_BOXES",
    "CT_WINDOWS",
    "INTENSITY_PRESETS",
    "RESIZE_MODES",
    "BoxPromptd",
    "ClickPromptd",
    "MaskPromptd",
    "NO_CLICK",
    "NO_MASK",
    "UserBoxPromptd",
    "CTWindowd",
    "CheckVolumePaird",
    "ReplaceNonFinited",
    "GreyToRGBd",
    "IntensityPresetd",
    "PercentileNormalized",
    "ResizeLongestPadd",
    "grow_box",
    "image_2d_transforms",
    "jitter_box",
    "mask_to_box",
    "morph_mask",
    "resize_longest_pad",
    "resized_size",
    "scale_box",
    "shift_mask",
    "slice_transforms",
    "undo_resize_longest_pad",
    "volume_transforms",
]
