# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Batch segmentation of volumes with box prompts: load, orient and normalise, predict slice-wise, invert to the
input's exact geometry, write, score against a reference, and report every skipped case with its reason."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd, SaveImage
from torch import nn

from samparser_monai.data.datalists import case_id
from samparser_monai.engines.evaluation import case_metrics
from samparser_monai.engines.prompt_engine import ObjectPrompt, PromptEngine, PromptResult
from samparser_monai.engines.prompt_files import OBJECT_SOURCES, json_box_prompts, json_object_prompts
from samparser_monai.engines.slice_inference import SlicePrompts, label_box_prompts, predict_volume
from samparser_monai.engines.stop_rule import StopRule
from samparser_monai.errors import root_message
from samparser_monai.files import staged_file
from samparser_monai.transforms.checks import NONFINITE_KEY
from samparser_monai.transforms.pipelines import volume_transforms

__all__ = ["PROMPT_SOURCES", "CaseOutcome", "VolumeSegmenter"]

logger = logging.getLogger(__name__)

#: Prompt sources of a run: ``label`` (oracle: a tight box from the reference on every slice, a baseline), ``boxes``
#: (each 3D box of the JSON projected on every slice it spans, a baseline), and through the prompt engine: ``roi``
#: (a 3D box, propagated from its centre slice within it), ``key`` (a box on one slice, propagated with the stop
#: rule; ``propagate`` is its old name) and ``points`` (clicks).
PROMPT_SOURCES = ("label", "boxes", "roi", "key", "points", "propagate")


@dataclass
class CaseOutcome:
    """What happened to one case."""

    case: str
    image: str
    status: str = "ok"
    reason: str = ""
    warning: str = ""
    output: str = ""
    slices: int = 0
    seconds: float = 0.0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    propagation: str = ""


def propagation_report(objects: Sequence[ObjectPrompt], result: PromptResult) -> tuple[str, list[str]]:
    """What the prompt engine did with each object, for ``summary.csv``: its kept slices and why each direction
    stopped (:attr:`PromptResult.stops`), e.g. ``label 1: 14 slices (area, roi)``; and one warning sentence for each
    object with nothing left in the result (found nothing at its prompt, or lost every voxel to another object).
    """
    parts, warnings = [], []
    for obj, kept, why in zip(objects, result.slices, result.stops):
        reasons = ", ".join(why) or "-"
        parts.append(f"label {obj.label}: {len(kept)} slice{'' if len(kept) == 1 else 's'} ({reasons})")
        if not bool((result.labels == obj.label).any()):
            found = "the model found nothing at its prompt" if not kept else "every voxel went to another label"
            warnings.append(f"label {obj.label} is empty in the result: {found} (stops: {reasons})")
    return "; ".join(parts), warnings


class VolumeSegmenter:
    """Segments volumes case by case with one of the :data:`PROMPT_SOURCES`.

    Args:
        network: a SamParser in eval mode (merge it first for stock speed).
        output_dir: folder of the label maps (``<case>_seg.nii.gz``).
        intensity: intensity preset of the model (see :func:`~samparser_monai.transforms.volume_transforms`).
        axis: slicing axis of the RAS-oriented volume (2: axial).
        batch_size: slices per encoder pass.
        jitter: box jitter for label-derived boxes (the evaluation protocol); ``seed`` makes it reproducible.
        reader: a MONAI image reader (``DicomSeriesReader`` for DICOM series folders).
        tolerance_mm: surface Dice tolerance of the metrics.
        qa_writer: optional callable ``(case, image, reference, prediction, prompts)`` that writes QA pictures.
        rule: stop rule of the prompt engine's propagation (``roi``, ``key``, ``points``).
        label_format: ``"image"`` (label map files) or ``"dicom_seg"`` (DICOM-SEG objects), for the references.

    A label map is written under a temporary name in ``output_dir`` and renamed into place once complete, so a run
    cut off mid-write never leaves a partial file under a result's name.
    """

    def __init__(
        self,
        network: nn.Module,
        output_dir: str,
        intensity: str = "mr",
        axis: int = 2,
        batch_size: int = 8,
        jitter: float = 0.0,
        seed: int = 0,
        reader: Any = None,
        tolerance_mm: float = 1.0,
        qa_writer: Callable | None = None,
        rule: StopRule | None = None,
        label_format: str = "image",
    ) -> None:
        self.network, self.output_dir, self.axis, self.batch_size = network, output_dir, axis, batch_size
        self.jitter, self.seed, self.tolerance_mm, self.qa_writer = jitter, seed, tolerance_mm, qa_writer
        self.engine = PromptEngine(network, axis, batch_size, rule)
        self.last_result = None  # the engine's PromptResult of the last case it segmented
        self.last_objects: list[ObjectPrompt] = []  # and the objects it was given
        self.with_label = volume_transforms(
            intensity, reader=reader, keys=("image", "label"), label_format=label_format
        )
        self.image_only = volume_transforms(intensity, reader=reader, keys=("image",))
        self.saver = SaveImage(
            output_dir=output_dir,
            output_postfix="seg",
            output_ext=".nii.gz",
            separate_folder=False,
            resample=False,
            output_dtype=np.int16,
            print_log=False,
        )

    def prompts(
        self,
        source: str,
        data: Mapping,
        boxes: Sequence[Mapping] | None,
        embeddings: dict[int, torch.Tensor] | None = None,
    ) -> SlicePrompts | torch.Tensor:
        """Prompts of one loaded case; for the engine's sources the predicted label map itself (prompting is
        sequential there), reusing and filling ``embeddings`` (slice index -> embedding of this image)."""
        image = data["image"]
        if source == "label":
            return label_box_prompts(data["label"][0], self.axis, jitter=self.jitter, seed=self.seed)
        if not boxes:
            return {}
        original = np.asarray(image.meta.get("original_affine", image.affine))
        oriented = np.asarray(image.affine)
        if source == "boxes":
            return json_box_prompts(boxes, original, oriented, image.shape[1:], self.axis)
        source = "key" if source == "propagate" else source
        if source not in OBJECT_SOURCES:
            raise ValueError(f"Unknown prompt source {source!r}; use one of {list(PROMPT_SOURCES)}.")
        objects = json_object_prompts(boxes, source, original, oriented, image.shape[1:], self.axis)
        self.last_result = self.engine.segment(image, objects, embeddings)
        self.last_objects = list(objects)
        return self.last_result.labels

    def segment(
        self,
        item: Mapping,
        source: str = "label",
        boxes: Sequence[Mapping] | None = None,
        embeddings: dict[int, torch.Tensor] | None = None,
    ) -> CaseOutcome:
        """Segment one datalist item (``image``, optional ``label`` and ``case``); never raises for a bad case.

        ``embeddings`` (the engine's sources): slice embeddings of this image kept by the caller between calls, e.g.
        from an :class:`~samparser_monai.engines.embedding_cache.EmbeddingCache`; slices found there are not
        encoded again.
        """
        case = str(item.get("case") or case_id(item["image"]))
        outcome = CaseOutcome(case=case, image=str(item["image"]))
        start = time.perf_counter()
        try:
            if item.get("error"):  # found unusable when the inputs were collected
                raise ValueError(item["error"])
            has_label = bool(item.get("label"))
            if source == "label" and not has_label:
                raise ValueError("no reference label map to derive boxes from")
            transform = self.with_label if has_label else self.image_only
            data = transform({"image": item["image"], **({"label": item["label"]} if has_label else {})})
            replaced = int(data["image"].meta.get(NONFINITE_KEY, 0))
            if replaced:
                outcome.warning = f"{replaced} NaN or infinite voxels were replaced by the image's finite range"
                logger.warning("case %s: %s.", case, outcome.warning)
            self.last_result, self.last_objects = None, []
            prompts = self.prompts(source, data, boxes, embeddings)
            if isinstance(prompts, torch.Tensor):
                prediction = prompts
                outcome.slices = int(prediction.any(dim=[d for d in range(3) if d != self.axis]).sum())
                if not prediction.any():
                    raise ValueError("no usable prompt: the model found nothing at the prompted slice")
                outcome.propagation, empty = propagation_report(self.last_objects, self.last_result)
                outcome.warning = "; ".join([w for w in (outcome.warning, *empty) if w])
                for sentence in empty:
                    logger.warning("case %s: %s.", case, sentence)
            else:
                if not prompts:
                    raise ValueError(
                        "no reference box on any slice" if source == "label" else "the prompt file has no prompt for it"
                    )
                outcome.slices = len(prompts)
                prediction = predict_volume(self.network, data["image"], prompts, self.axis, self.batch_size)
            if has_label:
                outcome.metrics = self._metrics(prediction, data["label"][0].long(), data["image"].affine)
            if self.qa_writer is not None:
                self.qa_writer(case, data["image"], data.get("label"), prediction, prompts)
            outcome.output = self._save(data, prediction, case_id(str(item["image"])))
        except Exception as err:  # a bad case is reported and skipped; the batch goes on
            outcome.status, outcome.reason = "skipped", root_message(err)
            logger.warning("case %s skipped: %s", case, outcome.reason)
        outcome.seconds = time.perf_counter() - start
        return outcome

    def _metrics(self, prediction: torch.Tensor, reference: torch.Tensor, affine: torch.Tensor) -> list[dict[str, Any]]:
        n = int(max(prediction.max(), reference.max())) + 1
        one_hot = [torch.nn.functional.one_hot(t, n).permute(3, 0, 1, 2) for t in (prediction, reference)]
        spacing = [float(s) for s in np.sqrt((np.asarray(affine, np.float64)[:3, :3] ** 2).sum(0))]
        rows = case_metrics(one_hot[0], one_hot[1], spacing, self.tolerance_mm)
        return [{"label": c, **row} for c, row in enumerate(rows, start=1) if bool((reference == c).any())]

    def _save(self, data: Mapping, prediction: torch.Tensor, name: str) -> str:
        image = data["image"]
        pred = MetaTensor(prediction[None].to(torch.int16), meta=dict(image.meta))  # its affine is the image's
        pred.applied_operations = list(image.applied_operations)
        transform = self.with_label if "label" in data else self.image_only
        inverted = Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=True)(
            {"image": image, "pred": pred}
        )["pred"]
        target = os.path.join(self.output_dir, f"{name}_seg.nii.gz")
        with staged_file(target, suffix=".nii.gz") as partial:
            self.saver(inverted, filename=partial)  # SaveImage appends the extension
        return target
