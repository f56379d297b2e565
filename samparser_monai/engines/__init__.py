# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Engines: slice-wise 3D inference with box prompts, metrics, checkpoint objects and bundle helpers."""

from samparser_monai.data.dataset_dir import (  # the bundle configs call them as samparser_monai.engines.<name>
    DATASET_FORMATS,
    INFERENCE_SPLITS,
    bundle_datalists,
    dataset_items,
    dataset_label_names,
    inference_datalist,
)
from samparser_monai.engines.batch import BatchEvaluator, BatchRun
from samparser_monai.engines.checkpoint import TrainableState, require_checkpoint
from samparser_monai.engines.coefficient_report import CoefficientMovementReport
from samparser_monai.engines.embedding_cache import EmbeddingCache, encode_slices
from samparser_monai.engines.evaluation import CaseMetricsWriter, case_metrics
from samparser_monai.engines.metrics import SliceDiceMetric
from samparser_monai.engines.prompt_engine import ObjectPrompt, PromptEngine, PromptResult
from samparser_monai.engines.prompt_files import load_box_json
from samparser_monai.engines.simulated_prompts import PROTOCOLS, SimulatedPromptInferer, simulate
from samparser_monai.engines.slice_inference import (
    LabelBoxSliceInferer,
    SlicePrompts,
    label_box_prompts,
    predict_volume,
)
from samparser_monai.engines.stop_rule import StopRule
from samparser_monai.engines.volume_inference import PROMPT_SOURCES, CaseOutcome, VolumeSegmenter
from samparser_monai.engines.workflow import RunReport, TimingReport, latest_checkpoint
from samparser_monai.process import retain_freed_host_memory

__all__ = [
    "BatchEvaluator",
    "BatchRun",
    "CaseOutcome",
    "EmbeddingCache",
    "INFERENCE_SPLITS",
    "PROMPT_SOURCES",
    "VolumeSegmenter",
    "dataset_items",
    "inference_datalist",
    "load_box_json",
    "require_checkpoint",
    "CaseMetricsWriter",
    "CoefficientMovementReport",
    "DATASET_FORMATS",
    "LabelBoxSliceInferer",
    "ObjectPrompt",
    "PROTOCOLS",
    "PromptEngine",
    "PromptResult",
    "RunReport",
    "SimulatedPromptInferer",
    "SliceDiceMetric",
    "SlicePrompts",
    "StopRule",
    "TimingReport",
    "TrainableState",
    "bundle_datalists",
    "case_metrics",
    "dataset_label_names",
    "encode_slices",
    "label_box_prompts",
    "latest_checkpoint",
    "predict_volume",
    "retain_freed_host_memory",
    "simulate",
]
