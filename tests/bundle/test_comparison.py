# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""The method comparison runs the bundle itself: every method trained and scored the same way, zero-shot without a
checkpoint, and the trunk cache shared across methods without changing a single number."""

from __future__ import annotations

import csv
from pathlib import Path

from conftest import CONFIGS, ROOT

from samparser_monai.benchmarks.comparison import ZERO_SHOT, Budget, compare_methods, run_bundle, summarise_metrics
from samparser_monai.networks.trunk_cache import TrunkFeatureCache

BUDGET = Budget(epochs=1, samples_per_epoch=2, batch_size=2, val_cases=1)


def _metrics(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as handle:
        return [(row["label"], row["dice"]) for row in csv.DictReader(handle)]


def test_compare_methods_trains_each_method_through_the_bundle(small_dataset, tmp_path):
    rows = compare_methods(
        [ZERO_SHOT, "decoder_only", "parser_paper"], small_dataset, tmp_path, BUDGET, ROOT, extra={"backbone": "tiny"}
    )
    assert [(r["method"], r["label"]) for r in rows] == [
        (method, label) for method in (ZERO_SHOT, "decoder_only", "parser_paper") for label in (1, 2)
    ]
    assert {r["label_name"] for r in rows} == {"head", "body"}, "names come from the dataset.json"
    assert all(0.0 <= r["dice"] <= 1.0 and r["cases"] == 1 for r in rows)
    assert all(r["step_ms"] > 0 and r["data_ms"] >= 0 for r in rows if r["method"] != ZERO_SHOT), "training timing"
    assert all(r["step_ms"] == r["data_ms"] == "" for r in rows if r["method"] == ZERO_SHOT), "nothing trained"
    assert not (tmp_path / ZERO_SHOT / "models").exists(), "zero-shot evaluates the stock model, trains nothing"
    for method in ("decoder_only", "parser_paper"):
        assert list((tmp_path / method / "models").glob("checkpoint_epoch=1.pt")), method
    with open(tmp_path / "accuracy.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 6, "one CSV row per method and label, appended as they finish"
    settings = (tmp_path / "parser_paper" / "evaluation" / "metrics.csv").read_text()
    assert "checkpoint_epoch=1.pt" in settings, "the evaluation scored the checkpoint the training saved"


def test_a_shorter_rerun_in_the_same_folder_scores_its_own_checkpoint(small_dataset, tmp_path):
    runs, table = tmp_path / "runs", tmp_path / "table.csv"
    two_epochs = Budget(epochs=2, samples_per_epoch=2, batch_size=2, val_cases=1)
    compare_methods(["decoder_only"], small_dataset, runs, two_epochs, ROOT, extra={"backbone": "tiny"})
    assert (runs / "decoder_only" / "models" / "checkpoint_epoch=2.pt").is_file()
    compare_methods(["decoder_only"], small_dataset, runs, BUDGET, ROOT, extra={"backbone": "tiny"}, csv_path=table)
    models = sorted(p.name for p in (runs / "decoder_only" / "models").glob("checkpoint_epoch=*.pt"))
    assert models == ["checkpoint_epoch=1.pt"], "the earlier run's checkpoints are gone"
    assert "checkpoint_epoch=1.pt" in (runs / "decoder_only" / "evaluation" / "metrics.csv").read_text()
    with open(table, newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 2, "the rows go to csv_path: one per label"


def test_shared_trunk_cache_changes_no_number(small_dataset, tmp_path):
    files = [CONFIGS / "train.json", CONFIGS / "evaluate.json"]
    base = {"dataset_dir": str(small_dataset), "backbone": "tiny", "val_fraction": 0.34, "zero_shot": True}
    run_bundle(files, {**base, "eval_output_dir": str(tmp_path / "alone")}, "evaluating")
    caches: dict[str, TrunkFeatureCache] = {}
    for name in ("first", "second"):
        run_bundle(files, {**base, "eval_output_dir": str(tmp_path / name)}, "evaluating", caches)
    (cache,) = caches.values()
    assert cache.hits > 0 and cache.hits == cache.misses, "the second run took every trunk feature from the first"
    alone = _metrics(tmp_path / "alone" / "metrics.csv")
    assert alone == _metrics(tmp_path / "first" / "metrics.csv") == _metrics(tmp_path / "second" / "metrics.csv")


def test_summarise_metrics_counts_empty_predictions_instead_of_averaging_them(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(
        "case,label,label_name,dice,surface_dice,hd95\n"
        "a,1,head,0.8,0.9,2.0\nb,1,head,0.0,0.0,inf\nc,1,head,nan,nan,nan\nb,2,body,0.6,0.7,4.0\n"
    )
    head, body = summarise_metrics(path)
    assert head["cases"] == 2 and head["empty"] == 1 and head["hd95"] == 2.0 and abs(head["dice"] - 0.4) < 1e-9
    assert body["cases"] == 1 and body["dice_sd"] == 0.0 and body["hd95"] == 4.0
