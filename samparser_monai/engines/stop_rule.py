# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""When the 3D prompt engine's propagation stops, and how its boxes are drawn: :class:`StopRule`, the defaults
measured for fine-tuned and stock models, and the command-line flags that set them.

    rule = StopRule.for_model(fine_tuned=True)      # the measured defaults for a fine-tuned checkpoint
    add_stop_rule_arguments(parser)                 # --stop-area, --stop-iou, --pad ... on a command
    rule = stop_rule_from_args(args, fine_tuned=True)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from torch import nn

from samparser_monai.networks.param_groups import unwrap_model

__all__ = [
    "FINE_TUNED_MIN_AREA",
    "FINE_TUNED_MAX_CLAIMED",
    "FINE_TUNED_MIN_OVERLAP",
    "FINE_TUNED_OVERLAP_AFTER",
    "FINE_TUNED_PAD",
    "FINE_TUNED_ROI_OVERLAP",
    "StopRule",
    "add_stop_rule_arguments",
    "stop_rule_from_args",
]


@dataclass(frozen=True)
class StopRule:
    """When propagation stops in a direction (any condition stops it; the slice that fails is not kept).

    The defaults come from traces of unstopped key-slice propagation on the dev validation split with a fine-tuned
    LiteMedSAM (``scripts/benchmark_prompts.py --trace``, ``scripts/choose_stop_rule.py``; docs/benchmarks.md,
    "3D prompts as users give them"): a tight box (no margin), since a loose one makes SAM fill it and the masks
    spread slice after slice; a predicted IoU of 0.7 and 80% overlap with the previous mask. A fine-tuned model's
    boxes also shrink by a pixel a side: use :meth:`for_model`.

    Attributes:
        min_area_fraction: the mask holds fewer pixels than this fraction of the start slice's mask.
        max_area_fraction: the mask holds more pixels than this multiple of the start slice's mask (0: no limit).
            Past an object's end SAM's masks tend to grow into what lies beyond, rather than vanish.
        min_iou: SAM's predicted IoU of the mask is below this.
        min_overlap: less than this fraction of the new mask lies on the previous slice's mask (the object left).
        roi_min_overlap: the same within an ROI (an object with a ``z_range``), where the ROI's bounds, not this
            stop, keep propagation on the object: a curved object's mask moves further from slice to slice than a
            key slice's runaway test allows (docs/benchmarks.md, "Stopping within an ROI"). None: ``min_overlap``;
            :meth:`for_model` sets :data:`FINE_TUNED_ROI_OVERLAP` for a fine-tuned model.
        max_claimed: more than this fraction of the new mask lies on another object's mask on the same slice, kept
            nearer that object's own start (0: no limit). A propagated mask that has run into a neighbouring object
            yields to it, and its direction ends there; which object yields depends only on the distances from the
            start slices, never on the order of the objects.
        overlap_after: the overlap tests (``min_overlap``, ``roi_min_overlap``) apply only to slices more than this
            many slices from the start. They catch a mask that has left the object past its end; next to the start
            slice the object is still there, and a curved one may move further than they allow (:meth:`for_model`
            sets :data:`FINE_TUNED_OVERLAP_AFTER` for a fine-tuned model; docs/benchmarks.md, "Overlap next to the
            start").
        max_distance: slices from the start slice (0: no limit).
        margin: the previous mask's box is grown by this fraction of its size on each side ...
        pad: ... plus this many pixels. A loose box makes SAM fill it, and a mask that fills its box grows the next
            box again: too much of either lets propagation spread slice after slice.
        click_multimask: a single click alone decodes SAM's three ambiguity masks and keeps the most confident (what
            SAM recommends, and what the stock model was trained for); otherwise the single-mask output, the one
            fine-tuning trains (with ``train_click_fraction`` > 0, on clicks too).
        mask_prompt: prompt each propagated slice with the previous slice's mask as well as its box (SAM's dense
            mask prompt). ``None`` (default): when the model was fine-tuned with mask prompts
            (``train_mask_prompt_fraction`` > 0, recorded in its checkpoint); the stock decoder was never trained
            with them and does worse with them (docs/benchmarks.md, "Mask prompts").
        mask_shrink: the previous mask is eroded by this many pixels before it becomes the prompt (as ``pad``
            shrinks the box: a mask prompt a little larger than the object compounds slice after slice too).
    """

    min_area_fraction: float = 0.2
    max_area_fraction: float = 0.0
    min_iou: float = 0.7
    min_overlap: float = 0.8
    roi_min_overlap: float | None = None
    max_claimed: float = 0.0
    overlap_after: int = 0
    max_distance: int = 0
    margin: float = 0.0
    pad: float = 0.0
    click_multimask: bool = True
    mask_prompt: bool | None = None
    mask_shrink: int = 1

    def uses_mask_prompt(self, network: nn.Module) -> bool:
        """Whether propagation passes the previous mask to ``network`` (see ``mask_prompt``)."""
        if self.mask_prompt is not None:
            return self.mask_prompt
        trained = getattr(unwrap_model(network), "training_prompts", None) or {}
        return float(trained.get("mask_prompt_fraction", 0.0)) > 0

    def stops(
        self,
        area_fraction: float,
        iou: float,
        overlap: float,
        distance: int,
        claimed: float = 0.0,
        in_roi: bool = False,
    ) -> str:
        """Which test ends a direction at a propagated, non-empty mask ("" to keep it): ``"area"``, ``"growth"``,
        ``"iou"``, ``"overlap"`` or ``"claimed"``, the first that fires in that order.

        The one statement of the rule: the engine calls it on each propagated mask, and ``scripts/choose_stop_rule.py``
        on the numbers of a trace.

        Args:
            area_fraction: the mask's area over the start slice's mask's.
            iou: SAM's predicted IoU of the mask.
            overlap: share of the mask on the previous slice's mask.
            distance: slices from the start slice (1 next to it).
            claimed: share of the mask on other objects' masks kept nearer their own starts.
            in_roi: the object has an ROI (``roi_min_overlap`` then applies, when set).
        """
        if area_fraction < self.min_area_fraction:
            return "area"
        if self.max_area_fraction and area_fraction > self.max_area_fraction:
            return "growth"
        if iou < self.min_iou:
            return "iou"
        min_overlap = self.roi_min_overlap if in_roi and self.roi_min_overlap is not None else self.min_overlap
        if distance > self.overlap_after and overlap < min_overlap:
            return "overlap"
        if self.max_claimed and claimed > self.max_claimed:
            return "claimed"
        return ""

    @classmethod
    def for_model(cls, fine_tuned: bool, **overrides) -> StopRule:
        """The measured defaults for a fine-tuned model or the stock one (``overrides``: fields set explicitly).

        A fine-tuned SAM fills the box it is given (it was trained on tight boxes), so a box taken from its previous
        mask is a little too large for the next slice and the masks grow slice after slice (to about twice the
        object's area 5 slices from the start); each propagated box then shrinks by :data:`FINE_TUNED_PAD` pixels a
        side. The stock model under-segments, and shrinking its boxes loses the object: it keeps ``pad`` 0
        (docs/benchmarks.md, "Boxes that shrink"). Within an ROI a fine-tuned model's propagation stops on
        :data:`FINE_TUNED_ROI_OVERLAP` overlap rather than ``min_overlap`` ("Stopping within an ROI"). A fine-tuned
        model answers a single click with its single-mask output, the only one fine-tuning trains
        (``click_multimask``), and tests overlap only past :data:`FINE_TUNED_OVERLAP_AFTER` slices from the start
        ("Overlap next to the start"). Its propagation stops below :data:`FINE_TUNED_MIN_AREA` of the start slice's
        area, below :data:`FINE_TUNED_MIN_OVERLAP` overlap, and where more than :data:`FINE_TUNED_MAX_CLAIMED` of a
        mask lies on another label's: the rule that gave mask-trained models the highest Dice on traces of
        unstopped propagation ("Stopping where the Dice says").
        """
        values = {
            "min_area_fraction": FINE_TUNED_MIN_AREA if fine_tuned else cls.min_area_fraction,
            "min_overlap": FINE_TUNED_MIN_OVERLAP if fine_tuned else cls.min_overlap,
            "max_claimed": FINE_TUNED_MAX_CLAIMED if fine_tuned else cls.max_claimed,
            "pad": FINE_TUNED_PAD if fine_tuned else 0.0,
            "roi_min_overlap": FINE_TUNED_ROI_OVERLAP if fine_tuned else None,
            "overlap_after": FINE_TUNED_OVERLAP_AFTER if fine_tuned else 0,
            "click_multimask": not fine_tuned,
        }
        values.update(overrides)
        return cls(**values)


#: area below which a fine-tuned model's propagation stops, a fraction of the start slice's mask (dev split)
FINE_TUNED_MIN_AREA = 0.1

#: overlap with the previous mask below which a fine-tuned model's key-slice propagation stops (dev split)
FINE_TUNED_MIN_OVERLAP = 0.7

#: share of a fine-tuned model's mask on another label's mask (kept nearer that label's start) that ends its direction
FINE_TUNED_MAX_CLAIMED = 0.5

#: pixels each propagated box shrinks by (a side) for a fine-tuned model, chosen on the dev validation split
FINE_TUNED_PAD = -1.0

#: overlap with the previous mask below which propagation stops within an ROI, for a fine-tuned model (dev split)
FINE_TUNED_ROI_OVERLAP = 0.5

#: slices next to the start where a fine-tuned model's propagation skips the overlap tests (dev split)
FINE_TUNED_OVERLAP_AFTER = 2

#: command-line flag -> (StopRule field, type, help)
_RULE_FLAGS = {
    "--stop-area": ("min_area_fraction", float, "propagation stops below this fraction of the start slice's mask area"),
    "--stop-growth": ("max_area_fraction", float, "... or above this multiple of it (0: no limit)"),
    "--stop-iou": ("min_iou", float, "... or below this predicted IoU"),
    "--stop-overlap": ("min_overlap", float, "... or when less than this fraction of a mask lies on the previous one"),
    "--stop-overlap-roi": ("roi_min_overlap", float, "... the same within an ROI"),
    "--stop-claimed": (
        "max_claimed",
        float,
        "... or when more than this fraction of a mask lies on another object's mask nearer its own start (0: off)",
    ),
    "--stop-overlap-after": ("overlap_after", int, "the overlap stops apply only past this many slices from the start"),
    "--max-distance": ("max_distance", int, "... or this many slices from the start (0: no limit)"),
    "--margin": ("margin", float, "each propagated box is the previous mask's box grown by this fraction of its size"),
    "--pad": ("pad", float, "... plus this many pixels (negative: shrunk)"),
    "--mask-shrink": ("mask_shrink", int, "pixels the previous mask is eroded by before it prompts the next slice"),
}


#: rule fields whose default depends on the model (:meth:`StopRule.for_model`), as their flags' help shows them
_BY_MODEL = {
    "max_claimed": f"{FINE_TUNED_MAX_CLAIMED:g} with a fine-tuned --checkpoint, {StopRule.max_claimed:g} (off) for "
    "the stock model",
    "min_area_fraction": f"{FINE_TUNED_MIN_AREA:g} with a fine-tuned --checkpoint, {StopRule.min_area_fraction:g} for "
    "the stock model",
    "min_overlap": f"{FINE_TUNED_MIN_OVERLAP:g} with a fine-tuned --checkpoint, {StopRule.min_overlap:g} for the stock "
    "model",
    "pad": f"{FINE_TUNED_PAD:g} with a fine-tuned --checkpoint, 0 for the stock model",
    "roi_min_overlap": f"{FINE_TUNED_ROI_OVERLAP:g} with a fine-tuned --checkpoint, --stop-overlap for the stock model",
    "overlap_after": f"{FINE_TUNED_OVERLAP_AFTER} with a fine-tuned --checkpoint, 0 for the stock model",
}


def add_stop_rule_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the :class:`StopRule` settings to a command's parser as flags (``--stop-area`` ...), defaults shown."""
    rule = StopRule()
    for flag, (name, kind, text) in _RULE_FLAGS.items():
        if name in _BY_MODEL:  # depends on the model: resolved by stop_rule_from_args
            parser.add_argument(flag, type=kind, default=None, help=f"{text} (default {_BY_MODEL[name]})")
            continue
        default = getattr(rule, name)
        parser.add_argument(flag, type=kind, default=default, help=f"{text} (default {default})")
    parser.add_argument(
        "--mask-prompt",
        choices=("auto", "on", "off"),
        default="auto",
        help="pass each propagated slice the previous slice's mask too (auto: when the checkpoint was trained with "
        "mask prompts, train_mask_prompt_fraction > 0)",
    )


def stop_rule_from_args(args: argparse.Namespace, fine_tuned: bool = False) -> StopRule:
    """The :class:`StopRule` of flags added by :func:`add_stop_rule_arguments`; flags left out take the defaults of
    :meth:`StopRule.for_model` (``fine_tuned``: a coefficient checkpoint is loaded)."""
    values = {name: getattr(args, flag[2:].replace("-", "_")) for flag, (name, _, _) in _RULE_FLAGS.items()}
    values["mask_prompt"] = {"on": True, "off": False}.get(getattr(args, "mask_prompt", "auto"))
    return StopRule.for_model(fine_tuned, **{name: value for name, value in values.items() if value is not None})
