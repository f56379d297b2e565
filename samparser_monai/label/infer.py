# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""MONAI Label infer task: an ROI and/or clicks from 3D Slicer become box prompts, segmented by the same
:class:`~samparser_monai.engines.volume_inference.VolumeSegmenter` as ``samparser-infer``, returned in the image's
own geometry."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Any

from samparser_monai.data.datalists import case_id
from samparser_monai.engines.embedding_cache import EmbeddingCache
from samparser_monai.engines.stop_rule import StopRule
from samparser_monai.engines.volume_inference import VolumeSegmenter
from samparser_monai.label._monailabel import HTTPException, InferTask, InferType
from samparser_monai.label.config import LabelConfig
from samparser_monai.label.geometry import read_geometry
from samparser_monai.label.model import LiveModel
from samparser_monai.label.refine import refine_file
from samparser_monai.label.requests import RequestError, plan_prompts

#: The app's propagation rule: its click boxes are loose (``click_box_mm``) and every result is clipped to the
#: request's bounds (``PromptPlan.keep``), so it propagates with a margin and stops late, as measured in its server
#: tests (ROI Dice 0.357, click 0.398 zero-shot); the engine's tight-box defaults suit tight key-slice boxes.
APP_RULE = StopRule(min_iou=0.5, min_overlap=0.3, margin=0.1, pad=1.0)

__all__ = ["APP_RULE", "SamParserInferTask", "app_rule"]


def app_rule(fine_tuned: bool, clicks_as_boxes: bool) -> StopRule:
    """The propagation rule of a request: :data:`APP_RULE` for the stock model and for boxes grown around clicks
    (loose by design); the engine's measured rule for a fine-tuned model given an ROI or clicks as clicks
    (:meth:`~samparser_monai.engines.StopRule.for_model`: a fine-tuned model fills its box, so propagated boxes shrink
    a pixel; docs/benchmarks.md, "Boxes that shrink")."""
    return StopRule.for_model(fine_tuned=True) if fine_tuned and not clicks_as_boxes else APP_RULE


logger = logging.getLogger(__name__)


class SamParserInferTask(InferTask):
    """Box-prompted 3D segmentation for MONAI Label clients (deepgrow-style: the mask goes to the selected segment).

    Request parameters: ``roi`` (``[i0, i1, j0, j1, k0, k1]``), ``foreground`` and ``background`` clicks
    (``[[i, j, k], ...]``), optional ``label`` (segment name, echoed) and ``click_box_mm``; all in voxel indices of
    the stored image. See :mod:`samparser_monai.label.requests` for how they become prompts (clicks go as clicks to
    a model whose checkpoint says it was trained with them, as boxes around them otherwise). Bad prompts are answered
    with HTTP 400 and one sentence; a result file (NIfTI, value 1 on the object) has the image's shape and affine.

    Args:
        model: the served network, reloaded when a new coefficient checkpoint is published.
        config: the app's settings (intensity preset, slicing axis, batch size, click box size, labels).
    """

    def __init__(self, model: LiveModel, config: LabelConfig) -> None:
        super().__init__(
            type=InferType.DEEPGROW,
            labels=list(config.labels),
            dimension=3,
            description=f"SAM-PARSER {config.backbone}: 3D mask from an ROI or clicks, slice by slice",
            config={"click_box_mm": config.click_box_mm},
        )
        self.model, self.settings = model, config
        self.embeddings = EmbeddingCache(config.embedding_cache_mb)

    def is_valid(self) -> bool:
        """Always servable: the stock base model needs no trained checkpoint."""
        return True

    def get_path(self, validate: bool = True) -> str | None:
        """The coefficient checkpoint served now (None: the stock base model)."""
        path = self.model.locate()
        return str(path) if path is not None else None

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Segment ``request["image"]`` from the request's prompts; returns the label map path and result params.

        Raises:
            HTTPException: 404 for a missing image, 400 for bad prompts, 422 when nothing could be segmented.
        """
        start = time.perf_counter()
        image = request.get("image")
        if not isinstance(image, str) or not os.path.isfile(image):
            raise HTTPException(status_code=404, detail=f"Image {image!r} was not found; pick an image of the studies.")
        try:
            network, checkpoint = self.model.current()
        except (ValueError, FileNotFoundError) as err:  # a published checkpoint that cannot be loaded
            raise HTTPException(status_code=500, detail=f"The model could not be loaded: {err}") from err
        clicks_trained = float(getattr(network, "training_prompts", {}).get("click_fraction", 0.0)) > 0
        try:
            geometry = read_geometry(image)
            plan = plan_prompts(request, geometry, self.settings.axis, self.settings.click_box_mm, clicks_trained)
        except RequestError as err:
            raise HTTPException(status_code=err.status, detail=str(err)) from err
        except ValueError as err:  # unreadable header
            raise HTTPException(status_code=422, detail=str(err)) from err
        loaded = time.perf_counter()
        work = tempfile.mkdtemp(prefix="samparser_label_")
        try:
            rule = app_rule(checkpoint is not None, clicks_as_boxes=plan.clicks_as_boxes)
            segmenter = VolumeSegmenter(
                network, work, self.settings.intensity, self.settings.axis, self.settings.batch_size, rule=rule
            )
            stat = os.stat(image)
            key = (
                image,
                stat.st_mtime_ns,
                stat.st_size,
                self.model.version,
                self.settings.intensity,
                self.settings.axis,
            )
            embeddings = self.embeddings.volume(key)
            cached = len(embeddings)
            outcome = segmenter.segment(
                {"image": image, "case": case_id(image)}, plan.source, plan.boxes, embeddings=embeddings
            )
            self.embeddings.trim()
            if outcome.status != "ok":
                raise HTTPException(
                    status_code=422,
                    detail=f"Nothing was segmented ({outcome.reason}); draw the roi around the object or click on it.",
                )
            voxels = refine_file(outcome.output, plan)
            handle, result = tempfile.mkstemp(suffix=".nii.gz", prefix="samparser_label_")
            os.close(handle)
            shutil.move(outcome.output, result)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        done = time.perf_counter()
        params = {
            "label": request.get("label") or self.settings.labels[0],
            "prompt": plan.source,
            "boxes": plan.boxes,
            "slices": outcome.slices,
            "foreground_voxels": voxels,
            "checkpoint": checkpoint,
            "cached_slices": cached,
            "encoded_slices": len(segmenter.last_result.encoded) if segmenter.last_result is not None else 0,
            "propagation": outcome.propagation,
            "latencies": {
                "load": round(loaded - start, 3),
                "infer": round(done - loaded, 3),
                "total": round(done - start, 3),
            },
        }
        logger.info("segmented %s from %s prompts: %d voxels in %.1f s", image, plan.source, voxels, done - start)
        return result, params
