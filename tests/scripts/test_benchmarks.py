# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""The benchmark scripts run as commands: tables out, one-sentence errors and non-zero exits on bad input."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from samparser_monai.networks.trunk_cache import TrunkFeatureCache

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_layers.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_benchmark_layers_smoke_run_writes_the_table(tmp_path):
    out = tmp_path / "table.md"
    result = _run("--shapes", "neck.0", "--tokens", "256", "--repeats", "1", "--warmup", "0", "--output", str(out))
    assert result.returncode == 0, result.stderr
    table = out.read_text()
    assert "| `neck.0` | Conv2d 768->256 k1, no bias |" in table
    assert "official factored" in table and "ours (eval)" in table and "merged" in table


@pytest.mark.slow
def test_benchmark_layers_help_and_bad_selection():
    assert _run("--help").returncode == 0
    result = _run("--shapes", "nope")
    assert result.returncode == 1
    assert "matches no layer" in result.stderr


@pytest.mark.slow
def test_trunk_cache_benchmark_smoke_run():
    script = SCRIPT.parent / "benchmark_trunk_cache.py"
    args = ["--backbone", "tiny", "--slices", "4", "--epochs", "2"]
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| 2 |" in result.stdout and "largest loss difference between the runs: 0.00e+00" in result.stdout


@pytest.mark.slow
def test_trunk_cache_breakdown_times_each_part_and_counts_operator_calls():
    script = SCRIPT.parent / "benchmark_trunk_cache.py"
    result = subprocess.run([sys.executable, str(script), "--backbone", "tiny", "--breakdown"], capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    for part in ("trunk forward", "neck forward + backward", "decoder + loss forward + backward"):
        assert re.search(rf"\| {re.escape(part)} \| \d+\.\d{{3}} \| 0\.\d{{3}} \|", result.stdout), part
    calls = re.search(r"operator calls in a cached step \(forward, backward, AdamW\): (\d+)", result.stdout)
    assert calls and int(calls.group(1)) > 100, result.stdout
    assert re.search(r"SamParser\.train\(\) \(the trainer calls it every step\): \d+\.\d\d ms", result.stdout)
    assert re.search(r"cached step, plain batch: \d\.\d{4} s; MetaTensor batch: \d\.\d{4} s", result.stdout)


@pytest.mark.slow
def test_method_benchmark_smoke_run(tmp_path):
    pytest.importorskip("peft", reason="the lora method needs the lora extra (peft)")
    script = SCRIPT.parent / "benchmark.py"
    args = ["--part", "cost", "--backbone", "tiny", "--repeats", "1", "--output-dir", str(tmp_path)]
    args += ["--variants", "full+checkpointing+bf16", "parser_encoder+official"]
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "cost.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"decoder_only", "parser_paper", "parser_official", "parser_encoder", "lora", "full"}
    assert "| 64 |" in rows["parser_paper"] and "| 496 |" in rows["parser_encoder"], "tiny SAM coefficient counts"
    assert "| 0 |" in rows["decoder_only"] and "| 1.00 |" in rows["decoder_only"]
    assert "| 496 |" in rows["parser_encoder+official"], "a variant keeps its method's coverage"
    assert rows["full+checkpointing+bf16"].split("|")[3] == rows["full"].split("|")[3], "same trainable total"


@pytest.mark.slow
def test_method_benchmark_refuses_bad_input_in_one_sentence(tmp_path):
    script = SCRIPT.parent / "benchmark.py"
    run = [sys.executable, str(script), "--backbone", "tiny", "--output-dir", str(tmp_path)]
    result = subprocess.run([*run, "--part", "cost", "--variants", "full+fast"], capture_output=True, text=True)
    assert result.returncode == 1 and "Unknown method or variant 'full+fast'" in result.stderr
    missing = tmp_path / "nowhere"
    result = subprocess.run([*run, "--part", "accuracy", "--dataset-dir", str(missing)], capture_output=True, text=True)
    assert result.returncode == 1 and f"dataset '{missing}' does not exist" in result.stderr


@pytest.mark.slow
def test_method_benchmark_accuracy_half_writes_one_runs_rows(tmp_path):
    """Run twice into the same folder: the table, CSV and plot hold the last run only (zero-shot + the method)."""
    from samparser_monai.data import make_demo_dataset

    data = make_demo_dataset(tmp_path / "Task00_Demo", n_cases=3, shape=(32, 36, 10), seed=1)
    script = SCRIPT.parent / "benchmark.py"
    args = ["--part", "accuracy", "--backbone", "tiny", "--methods", "decoder_only", "--dataset-dir", str(data)]
    args += ["--samples", "2", "--val-cases", "1", "--output-dir", str(tmp_path / "out")]
    for _ in range(2):
        result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
    rows = (tmp_path / "out" / "accuracy.csv").read_text().splitlines()
    assert len(rows) == 1 + 4, "a header and one row per method and label, of the last run only"
    assert {row.split(",")[0] for row in rows[1:]} == {"zero_shot", "decoder_only"}
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 0
    table = (tmp_path / "out" / "accuracy.md").read_text()
    assert "| train s | eval s | step ms | data ms |" in table
    assert re.search(r"\| zero_shot \|.* \| - \| - \|", table), "zero-shot trains nothing: no step timing"
    assert re.search(r"\| decoder_only \|.* \| \d+\.\d \| \d+\.\d \|", table), "training step and data wait"


@pytest.mark.slow
def test_method_benchmark_resume_runs_only_what_is_missing(tmp_path):
    """A run cut off after some methods goes on with ``--resume``: finished methods are kept as they were (their
    timings too), the rest run; other settings are refused in one sentence and the earlier rows are kept."""
    from samparser_monai.data import make_demo_dataset

    data = make_demo_dataset(tmp_path / "Task00_Demo", n_cases=3, shape=(32, 36, 10), seed=1)
    script = SCRIPT.parent / "benchmark.py"
    out = tmp_path / "out"
    args = ["--part", "accuracy", "--backbone", "tiny", "--dataset-dir", str(data), "--samples", "2"]
    args += ["--val-cases", "1", "--output-dir", str(out)]
    first = subprocess.run([sys.executable, str(script), *args, "--methods", "decoder_only"], capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    before = (out / "accuracy.csv").read_text().splitlines()
    args += ["--methods", "decoder_only", "parser_paper", "--resume"]
    second = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    after = (out / "accuracy.csv").read_text().splitlines()
    assert after[: len(before)] == before, "kept rows unchanged, timings included"
    assert [row.split(",")[0] for row in after[1:]] == ["zero_shot"] * 2 + ["decoder_only"] * 2 + ["parser_paper"] * 2
    assert "resumed: zero_shot, decoder_only kept from an earlier run" in (out / "accuracy.md").read_text()
    assert "parser_paper" in (out / "accuracy.md").read_text()

    args[args.index("--samples") + 1] = "4"
    refused = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    assert refused.returncode == 1
    assert "was made with other settings (budget" in refused.stderr and "run without --resume" in refused.stderr
    assert (out / "accuracy.csv").read_text().splitlines() == after


def test_resume_reruns_a_method_cut_off_between_its_rows(tmp_path):
    benchmark = _load_script("benchmark")
    settings = {"backbone": "tiny"}
    (tmp_path / "accuracy_settings.json").write_text('{"backbone": "tiny"}')
    header = "method,label,label_name,cases,dice,dice_sd,hd95,empty,train_s,eval_s,step_ms,data_ms"
    rows = ["zero_shot,1,A,2,0.5,0.1,2.0,0,0,3.5,,", "zero_shot,2,B,2,0.6,0.1,1.0,1,0,3.5,,",
            "lora,1,A,2,0.7,0.1,1.5,0,9.1,2.0,40.2,3.1"]  # fmt: skip
    (tmp_path / "accuracy.csv").write_text("\n".join([header, *rows]) + "\n")
    kept = benchmark.kept_rows(tmp_path, settings)
    assert [r["method"] for r in kept] == ["zero_shot", "zero_shot"], "lora lost its second label row: it reruns"
    assert kept[1]["empty"] == 1 and kept[0]["dice"] == 0.5 and kept[0]["step_ms"] == ""
    (tmp_path / "accuracy_settings.json").unlink()
    with pytest.raises(ValueError, match="settings of .* are unknown"):
        benchmark.kept_rows(tmp_path, settings)


@pytest.mark.slow
def test_host_memory_benchmark_compares_both_settings_with_equal_losses():
    script = SCRIPT.parent / "benchmark_host_memory.py"
    args = ["--backbone", "tiny", "--steps", "2", "--warmup", "1"]
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    for work in ("train", "infer"):
        for setting in ("release", "retain"):
            assert re.search(
                rf"\| {work} \| {setting} \| \d+\.\d\d \| [\d,]+ \| \d+\.\d\d \| \d+\.\d\d \|", result.stdout
            )
    assert "training losses identical in both settings" in result.stdout
    refused = subprocess.run([sys.executable, str(script), "--steps", "2", "--warmup", "2"], capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert refused.returncode == 1 and "--steps must be more than --warmup" in refused.stderr


@pytest.mark.slow
def test_coefficient_sweep_records_dice_and_movement_and_resumes(tmp_path):
    """Two runs of the sweep into one folder: the second (--resume, one more learning rate) adds only that run."""
    from samparser_monai.data import make_demo_dataset

    data = make_demo_dataset(tmp_path / "Task00_Demo", n_cases=3, shape=(32, 36, 10), seed=1)
    script = SCRIPT.parent / "sweep_coefficients.py"
    args = ["--backbone", "tiny", "--methods", "coefficients_paper", "--references", "zero_shot", "--steps", "2"]
    args += ["--parametrizations", "relative", "--val-cases", "1", "--dataset-dir", str(data)]
    args += ["--output-dir", str(tmp_path / "out"), "--train-click-fraction", "0"]
    boxes = ["--train-mask-prompt-fraction", "0"]  # the bundle's default trains with mask prompts: pin boxes alone
    first = subprocess.run([sys.executable, str(script), *args, *boxes, "--learning-rates", "1e-2"],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    second = subprocess.run([sys.executable, str(script), *args, *boxes, "--learning-rates", "1e-2", "3e-2",
                             "--resume"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert second.returncode == 0, second.stderr[-2000:]
    assert "sweep: 100%|██████████| 1/1" in second.stderr, "only the new learning rate runs"
    rows = (tmp_path / "out" / "sweep.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * 2, "a header, then one row per run and label"
    table = (tmp_path / "out" / "sweep.md").read_text()
    assert re.search(r"\| zero_shot \| - \| - \| 2 \| 0 \| 0\.\d{4} \|.*\| - \| - \|", table)
    moved = re.findall(r"\| coefficients_paper \| relative \| (0\.0[13]) \| 2 \| 0 \| .* \| (\d+\.\d\d)% \| ", table)
    assert [lr for lr, _ in moved] == ["0.01", "0.03"] and all(float(m) > 0 for _, m in moved), table
    assert (tmp_path / "out" / "sweep.png").stat().st_size > 0
    assert "training prompts" not in table, "a sweep trained on boxes alone keeps the table it always had"

    masks = subprocess.run([sys.executable, str(script), *args, "--learning-rates", "1e-2", "--resume",
                            "--train-mask-prompt-fraction", "0.5"],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert masks.returncode == 0, masks.stderr[-2000:]
    assert "sweep: 100%|██████████| 1/1" in masks.stderr, "the same rate trained with mask prompts is another run"
    assert (tmp_path / "out" / "runs" / "coefficients_paper_relative_0.01_2_0_masks0.5" / "models").is_dir()
    table = (tmp_path / "out" / "sweep.md").read_text()
    assert re.search(r"\| coefficients_paper \| relative \| 0\.01 \| 2 \| 0 \| masks 0\.5 \| 0\.\d{4} \|", table), table
    assert re.search(r"\| coefficients_paper \| relative \| 0\.01 \| 2 \| 0 \| boxes \| 0\.\d{4} \|", table), table
    missing = subprocess.run([sys.executable, str(script), "--dataset-dir", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert missing.returncode == 1 and "does not exist" in missing.stderr.strip().splitlines()[-1]


def _load_script(name: str):

    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_reads_an_older_csv_as_trained_on_boxes_and_upgrades_it(tmp_path):
    """A ``sweep.csv`` from before the training prompts were recorded: its runs trained on boxes alone (the bundle's
    defaults then), resuming matches them as such, and the file is rewritten with today's columns, values kept."""
    sweep = _load_script("sweep_coefficients")
    old = ["method,parametrization,coefficient_lr,steps,seed,label,label_name,cases,dice,dice_sd,hd95,mean_dice,"
           "moved_median,moved_max,train_s,eval_s",
           "parser_paper,relative,0.1,80,0,1,Anterior,26,0.8684,0.03,1.2,0.8672,0.48,11.3,60.1,300.2"]  # fmt: skip
    path = tmp_path / "sweep.csv"
    path.write_text("\n".join(old) + "\n")
    before = sweep.read_rows(path)
    assert sweep.run_key(before[0]) == ("parser_paper", "relative", 0.1, 80, 0, 0.0, 0.0)
    assert sweep.prompts_label(before[0]) == "boxes"
    sweep.upgrade_csv(path)
    lines = path.read_text().splitlines()
    assert lines[0].split(",") == sweep.FIELDS
    after = sweep.read_rows(path)
    assert after == before and after[0]["dice"] == "0.8684" and after[0]["mask_fraction"] == "0"
    assert sweep.prompts_label({"click_fraction": "0.5", "mask_fraction": "0.5"}) == "clicks 0.5, masks 0.5"


def test_sweep_summarises_runs_over_seeds_against_decoder_only_at_the_same_seeds():
    """A configuration with several seeds gets one row: its mean Dice over seeds (SD), ``decoder_only`` at the same
    seeds, budget and training prompts, and the per-seed differences; one seed alone, or a reference missing a seed,
    gives no difference (never one measured against other seeds)."""
    sweep = _load_script("sweep_coefficients")

    def run(method: str, parametrization: str, lr: float, seed: int, mean: float, steps: int = 80) -> dict:
        return {"method": method, "parametrization": parametrization, "coefficient_lr": str(lr), "steps": str(steps),
                "seed": str(seed), "click_fraction": "0", "mask_fraction": "0", "mean_dice": str(mean)}  # fmt: skip

    rows = [run("decoder_only", "", 0, s, m) for s, m in ((0, 0.86), (1, 0.87), (2, 0.85))]
    rows += [run("parser_paper", "additive", 0.1, s, m) for s, m in ((0, 0.87), (1, 0.87), (2, 0.86))]
    rows += [run("parser_paper", "relative", 0.1, 0, 0.9)]  # one seed: no row
    rows += [run("parser_paper", "relative", 0.1, s, 0.88, steps=400) for s in (1, 2)]  # no decoder_only at 400
    table = sweep.render_seeds(rows).splitlines()
    assert len(table) == 4, table
    assert table[2] == ("| parser_paper | additive | 0.1 | 80 | boxes | 0 1 2 | 0.8667 (0.0058) | 0.8600 (0.0100) | "
                        "+0.67 (0.58) | 2 of 3 |")  # fmt: skip
    assert table[3] == "| parser_paper | relative | 0.1 | 400 | boxes | 1 2 | 0.8800 (0.0000) | - | - | - |"
    assert sweep.render_seeds(rows[:4]) == "", "no configuration with two seeds: no table"


def test_sweep_goes_on_past_a_failed_run_and_keeps_its_table_current(tmp_path, monkeypatch, capsys):
    """A run that fails (a training error, a full disk) is one sentence; the runs after it still run, ``sweep.md``
    is rewritten after every run (never stale, even when the sweep is stopped), and the exit says it failed."""
    sweep = _load_script("sweep_coefficients")
    seen = []

    def fake_run(run, args, caches):
        seen.append(run["coefficient_lr"])
        if run["coefficient_lr"] == 0.03:
            raise RuntimeError("Training parser_paper_relative_0.03_2_0 saved no checkpoint.")
        table_before = (tmp_path / "out" / "sweep.md").read_text() if len(seen) > 1 else ""
        assert all(f"| {lr:g} |" in table_before for lr in seen[:-1] if lr != 0.03), "the table lags no run behind"
        extra = {"cases": 1, "dice_sd": 0.0, "hd95": 1.0, "moved_median": 0.1, "moved_max": 0.2, "train_s": 1.0}
        return [
            {**run, **extra, "label": k, "label_name": name, "dice": 0.8, "mean_dice": 0.8, "eval_s": 1.0}
            for k, name in ((1, "Anterior"), (2, "Posterior"))
        ]

    monkeypatch.setattr(sweep, "one_run", fake_run)
    monkeypatch.setattr(sweep, "retain_freed_host_memory", lambda on: None)
    argv = ["--methods", "parser_paper", "--parametrizations", "relative", "--learning-rates", "0.01", "0.03", "0.1"]
    argv += ["--references", "--dataset-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")]
    argv += ["--train-click-fraction", "0", "--train-mask-prompt-fraction", "0"]
    assert sweep.main(argv) == 1
    out, err = capsys.readouterr()
    assert seen == [0.01, 0.03, 0.1], "the run after the failed one still ran"
    assert "failed, skipped: parser_paper relative lr 0.03 80 steps, seed 0, trained on boxes: Training" in out
    assert "1 of 3 runs failed (the table holds the others; rerun with --resume)" in err.strip().splitlines()[-1]
    table = (tmp_path / "out" / "sweep.md").read_text()
    assert "| 0.01 |" in table and "| 0.1 |" in table and "| 0.03 |" not in table
    assert len((tmp_path / "out" / "sweep.csv").read_text().splitlines()) == 1 + 2 * 2


def test_sweep_says_when_the_trunk_cache_was_too_small_for_a_run(tmp_path, monkeypatch, capsys):
    """A shared trunk cache that drops features during a run (its budget holds less than the run's slices, so a
    repeated pass reuses nothing and the sweep runs far slower) is said after that run, with the flag that fixes it;
    a run that dropped nothing says nothing."""
    sweep = _load_script("sweep_coefficients")

    def fake_run(run, args, caches):
        cache = caches.setdefault("trunk", TrunkFeatureCache(max_bytes=2 * 4 * 8))  # two features of 8 floats
        if run["coefficient_lr"] == 0.1:
            for i in range(5):  # five slices through a cache that holds two
                cache(torch.full((1, 4), float(i)), lambda x: x.new_zeros(len(x), 8))
        extra = {"cases": 1, "dice_sd": 0.0, "hd95": 1.0, "moved_median": 0.1, "moved_max": 0.2, "train_s": 1.0}
        return [{**run, **extra, "label": 1, "label_name": "Anterior", "dice": 0.8, "mean_dice": 0.8, "eval_s": 1.0}]

    monkeypatch.setattr(sweep, "one_run", fake_run)
    monkeypatch.setattr(sweep, "retain_freed_host_memory", lambda on: None)
    argv = ["--methods", "parser_paper", "--parametrizations", "relative", "--learning-rates", "0.01", "0.1"]
    argv += ["--references", "--dataset-dir", str(tmp_path), "--output-dir", str(tmp_path / "out"), "--cache-gb", "1"]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("The trunk cache was full")]
    assert warnings == [
        "The trunk cache was full: 3 features were dropped during this run and are computed again when needed; raise "
        "--cache-gb (now 1) to keep a run's training and validation slices together."
    ]
    assert out.index("lr 0.1 80 steps") < out.index("The trunk cache was full"), "said after the run that dropped"


def test_method_benchmark_goes_on_past_a_failed_method_and_keeps_its_table_current(tmp_path, monkeypatch, capsys):
    """A method that fails is one sentence; the methods after it still run (sharing the comparison's trunk cache),
    ``accuracy.md`` is rewritten after every method (never stale, even when the run is stopped), and the exit says
    which failed. A table left by an earlier run into the folder is gone before the first method finishes."""
    from samparser_monai.benchmarks import comparison

    benchmark = _load_script("benchmark")
    out = tmp_path / "out"
    out.mkdir()
    (out / "accuracy.md").write_text("| lora | an earlier run's table |\n")
    seen = []

    def fake_one(method, files, run, shared, cache_bytes, csv_path):
        table = (out / "accuracy.md").read_text() if (out / "accuracy.md").exists() else ""
        assert "an earlier run" not in table, "the earlier run's table is gone"
        assert all(f"| {m} |" in table for m in seen if m != "parser_paper"), "the table lags no method behind"
        seen.append(method)
        if method == "parser_paper":
            raise RuntimeError("Training parser_paper saved no checkpoint in runs/parser_paper/models.")
        rows = [{"method": method, "label": k, "label_name": name, "cases": 1, "dice": 0.8, "dice_sd": 0.0,
                 "hd95": 1.0, "empty": 0, "train_s": 1.0, "eval_s": 1.0, "step_ms": "", "data_ms": ""}
                for k, name in ((1, "Anterior"), (2, "Posterior"))]  # fmt: skip
        comparison._append_rows(csv_path, rows)
        return rows

    monkeypatch.setattr(comparison, "_compare_one", fake_one)
    monkeypatch.setattr(benchmark, "retain_freed_host_memory", lambda on: None)
    argv = ["--part", "accuracy", "--backbone", "tiny", "--methods", "decoder_only", "parser_paper", "lora"]
    argv += ["--dataset-dir", str(tmp_path), "--output-dir", str(out), "--device", "cpu"]
    assert benchmark.main(argv) == 1
    printed, err = capsys.readouterr()
    assert seen == ["zero_shot", "decoder_only", "parser_paper", "lora"], "the method after the failed one still ran"
    assert "parser_paper failed, skipped: Training parser_paper saved no checkpoint" in err
    assert "1 method(s) failed (parser_paper); the table holds the others: rerun with --resume." in err
    table = (out / "accuracy.md").read_text()
    assert "| lora |" in table and "| zero_shot |" in table and "| parser_paper |" not in table
    assert "(failed: parser_paper; rerun with --resume)" in table and "still running" not in table
    assert table in printed
    assert len((out / "accuracy.csv").read_text().splitlines()) == 1 + 3 * 2


def test_training_prompt_shares_default_to_the_bundles_and_refuse_a_non_share():
    import argparse
    import json

    from samparser_monai.benchmarks.comparison import add_training_prompt_arguments, training_prompts

    root = SCRIPT.parents[1]
    defaults = json.loads((root / "bundle" / "configs" / "train.json").read_text())
    parser = argparse.ArgumentParser()
    add_training_prompt_arguments(parser)
    shares = training_prompts(parser.parse_args([]), root)
    assert shares == {key: float(defaults[key]) for key in ("train_click_fraction", "train_mask_prompt_fraction")}
    pinned = training_prompts(parser.parse_args(["--train-mask-prompt-fraction", "0"]), root)
    assert pinned["train_mask_prompt_fraction"] == 0.0
    with pytest.raises(ValueError, match="--train-click-fraction 1.5 is not a share"):
        training_prompts(parser.parse_args(["--train-click-fraction", "1.5"]), root)


@pytest.mark.slow
def test_prompt_protocol_benchmark_reports_every_protocol(tmp_path):
    from samparser_monai.data import make_demo_dataset

    data = make_demo_dataset(tmp_path / "Task00_Demo", n_cases=3, shape=(32, 36, 10), seed=1)
    script = SCRIPT.parent / "benchmark_prompts.py"
    args = ["--backbone", "tiny", "--dataset-dir", str(data), "--output-dir", str(tmp_path / "out"), "--trace"]
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "out" / "prompts.md").read_text()
    for protocol in ("label", "roi_boxes", "roi", "key", "click1", "click3"):
        assert re.search(rf"^\| {protocol} \| 0\.\d{{3}} \| [\d.]+ \| [\d.]+ \| 0\.\d{{3}} \|", table, re.M), protocol
    assert re.search(r"^\| label \| 0\.\d{3} \| [\d.]+ \| 1\.00 \|", table, re.M), "the oracle row"
    rows = list(csv.DictReader((tmp_path / "out" / "prompts.csv").read_text().splitlines()))
    assert {r["protocol"] for r in rows} == {"label", "roi_boxes", "roi", "key", "click1", "click3"}
    passes = {r["protocol"]: int(r["encoder_passes"]) for r in rows}
    assert passes["click3"] <= 10, "later clicks reuse the encoded slices (10 slices in the volume)"
    trace = (tmp_path / "out" / "trace.csv").read_text().splitlines()
    head = "slice,direction,area,area_fraction,iou,overlap,claimed,stop,label,case,protocol,in_reference,distance,"
    pixels = "predicted_area,reference_area,intersection,label_voxels"
    assert trace[0] == head + "slice_dice,area_ratio," + pixels and len(trace) > 2
    traced = list(csv.DictReader(trace))
    assert all(0.0 <= float(r["slice_dice"]) <= 1.0 for r in traced)
    for r in traced:  # the pixel counts are the ones behind the slice's Dice
        total = int(r["predicted_area"]) + int(r["reference_area"])
        assert abs(float(r["slice_dice"]) - (2 * int(r["intersection"]) / total if total else 1.0)) < 1e-4, r
        assert int(r["intersection"]) <= min(int(r["reference_area"]), int(r["predicted_area"]))
        assert int(r["reference_area"]) <= int(r["label_voxels"]) and int(r["in_reference"]) == (
            r["reference_area"] != "0"
        )
    chosen = _choose(str(tmp_path / "out" / "trace.csv"), "--top", "2")
    assert chosen.returncode == 0 and "| never stop |" in chosen.stdout, chosen.stderr[-2000:]
    assert {r["distance"] for r in traced if r["direction"] == "0"} == {"0"}
    by_distance = (tmp_path / "out" / "by_distance.md").read_text()
    assert re.search(r"^\| key \| 1 \| Dice \| [01]\.\d{3} \|", by_distance, re.M), by_distance
    # --share-embeddings: one encoding per slice for all protocols, the same masks and pass counts, no seconds
    shared_args = [*args[:4], "--output-dir", str(tmp_path / "shared"), "--share-embeddings"]
    shared = subprocess.run([sys.executable, str(script), *shared_args], capture_output=True, text=True, timeout=600)
    assert shared.returncode == 0, shared.stderr[-2000:]
    again = list(csv.DictReader((tmp_path / "shared" / "prompts.csv").read_text().splitlines()))
    assert [(r["protocol"], r["label"], r["encoder_passes"], r["fp_slices"]) for r in again] == [
        (r["protocol"], r["label"], r["encoder_passes"], r["fp_slices"]) for r in rows
    ]
    assert [r["dice"] for r in again] == [r["dice"] for r in rows], "the same masks"
    assert all(r["seconds"] == "nan" for r in again)
    assert re.search(r"^\| click3 \| .* \| [\d.]+ \| - \|$", (tmp_path / "shared" / "prompts.md").read_text(), re.M)
    # --first-case skips the first cases (choose on some, confirm on the others); past the last one: one sentence
    outside = subprocess.run([sys.executable, str(script), *args[:4], "--first-case", "1"], capture_output=True,
                             text=True, timeout=600)  # fmt: skip
    assert outside.returncode == 1 and "--first-case 1 is outside the 1 validation cases" in outside.stderr


@pytest.mark.slow
def test_prompt_protocol_benchmark_skips_a_bad_case_leaves_no_stale_table_and_resumes(tmp_path):
    """One unreadable validation case: one sentence, the other case still reported, exit 1; the tables of an earlier
    run in the same folder are removed first (a ``trace.csv`` this run does not write cannot pass for its own).
    Mended, ``--resume`` runs only that case and keeps the other's rows; other settings are refused."""
    from samparser_monai.data import bundle_datalists, make_demo_dataset

    data = make_demo_dataset(tmp_path / "Task00_Demo", n_cases=10, shape=(32, 36, 6), seed=1)
    _, cases = bundle_datalists(data, "msd", 0.2, 0)
    assert len(cases) == 2
    image = Path(cases[0]["image"])
    original = image.read_bytes()
    image.write_bytes(b"not a NIfTI file")
    out = tmp_path / "out"
    out.mkdir()
    (out / "trace.csv").write_text("an earlier run's trace\n")
    script = SCRIPT.parent / "benchmark_prompts.py"
    args = ["--backbone", "tiny", "--dataset-dir", str(data), "--output-dir", str(out), "--protocols", "label", "key"]

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), *args, *extra], capture_output=True, text=True, timeout=600)

    result = run()
    assert result.returncode == 1, result.stderr[-2000:]
    bad, good = cases[0]["case"], cases[1]["case"]
    assert f"case {bad} skipped: " in result.stderr
    assert f"error: 1 of 2 cases skipped ({bad}); the tables hold the others: rerun with --resume" in result.stderr
    assert not (out / "trace.csv").exists()
    table = (out / "prompts.md").read_text()
    assert table.startswith(f"1 cases (skipped: {bad})"), table
    assert re.search(r"^\| key \| 0\.\d{3} \|", table, re.M), table
    first = list(csv.DictReader((out / "prompts.csv").read_text().splitlines()))
    assert {r["case"] for r in first} == {good}

    refused = run("--resume", "--batch-size", "4")
    assert refused.returncode == 1 and "was made with other settings (batch_size differ)" in refused.stderr
    assert (out / "prompts.csv").exists(), "a refused resume loses nothing"
    image.write_bytes(original)
    resumed = run("--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (out / "prompts.md").read_text().startswith("2 cases (resumed: 1 cases kept"), resumed.stdout
    second = list(csv.DictReader((out / "prompts.csv").read_text().splitlines()))
    assert [r for r in second if r["case"] == good] == first, "the finished case is kept, not run again"
    assert {r["protocol"] for r in second if r["case"] == bad} == {"label", "key"}


def _choose(*args: str) -> subprocess.CompletedProcess:
    """choose_stop_rule.py's ``main`` run in this process (it imports the library once for every test, not once a
    run), with its exit code and printed output as a finished subprocess would give them."""
    spec = importlib.util.spec_from_file_location("choose_stop_rule", SCRIPT.parent / "choose_stop_rule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = module.main(list(args))
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def _best_stop_rule(
    tmp_path, statistics, score: str = "area", pixels=None, claimed=None
) -> tuple[list[str], subprocess.CompletedProcess, list[str]]:
    """Run choose_stop_rule.py on a trace of one object, 4 slices each way from its start slice and 3 past each end,
    ``statistics(step)`` giving each slice's (predicted IoU, overlap), ``pixels(direction, step)`` (``--score
    dice``) its predicted and overlapping pixels, ``claimed(step)`` its share on another object's mask; the best
    rule's cells, the run, the lines."""
    head = "slice,direction,area,area_fraction,iou,overlap,stop,label,case,protocol,in_reference"
    head += ",predicted_area,intersection,label_voxels" if pixels is not None else ""
    head += ",claimed" if claimed is not None else ""
    extra = (lambda direction, step: ",{},{},370".format(*pixels(direction, step))) if pixels else lambda *_: ""
    shared = (lambda step: f",{claimed(step)}") if claimed else lambda _: ""
    lines = [head, "10,0,50,1.0,0.95,1.0,,1,a,key,1" + extra(0, 0) + shared(0)]
    for direction in (-1, 1):
        for step in range(1, 8):
            at = step if direction < 0 else step + 10
            iou, overlap = statistics(at)
            lines.append(f"{10 + direction * step},{direction},40,0.8,{iou},{overlap},,1,a,key,{int(step <= 4)}"
                         + extra(direction, step) + shared(at))  # fmt: skip
    trace = tmp_path / "trace.csv"
    trace.write_text("\n".join(lines) + "\n")
    result = _choose(str(trace), "--top", "1", "--score", score)
    assert result.returncode == 0, result.stderr
    best = [line for line in result.stdout.splitlines() if line.startswith("| ")][1]
    return [c.strip() for c in best.strip("|").split("|")], result, lines


def test_choose_stop_rule_finds_the_rule_that_separates_the_trace(tmp_path):
    """A trace where SAM's predicted IoU drops once the object ends: the best rules keep exactly the object."""
    cells, result, lines = _best_stop_rule(tmp_path, lambda step: (0.9 if step % 10 <= 4 else 0.4, 0.9))
    assert 0.4 < float(cells[2]) <= 0.9 and cells[6:] == ["0", "0.00", "0.00"], result.stdout
    assert "| never stop | | | | | | 240 | 6.00 | 0.00 |" in result.stdout
    old = tmp_path / "old.csv"
    old.write_text(lines[0].rsplit(",", 1)[0] + "\n")
    refused = _choose(str(old))
    assert refused.returncode == 1 and "has no in_reference column" in refused.stderr


def test_choose_stop_rule_scores_the_overlap_test_past_the_start(tmp_path):
    """A curved object that moves most on the slice next to the start (overlap 0.1 there, 0.9 further on) and is
    left past its end (overlap 0.2): no overlap threshold alone separates the two, skipping the overlap test on the
    first slice does (``StopRule.overlap_after``)."""
    cells, result, _ = _best_stop_rule(
        tmp_path, lambda step: (0.9, 0.1 if step % 10 == 1 else 0.9 if step % 10 <= 4 else 0.2)
    )
    assert 0.2 < float(cells[3]) <= 0.9 and int(cells[4]) >= 1, result.stdout
    assert cells[6:] == ["0", "0.00", "0.00"], result.stdout


def test_choose_stop_rule_stops_a_mask_that_runs_onto_another_object(tmp_path):
    """Past its end the mask runs on along the structure, as confident and as overlapping as inside it, but onto
    another label's mask (claimed 0.9): only ``max claimed`` separates the two (``StopRule.max_claimed``)."""
    cells, result, _ = _best_stop_rule(
        tmp_path, lambda step: (0.9, 0.9), claimed=lambda step: 0.9 if step % 10 > 4 else 0.1
    )
    assert 0.1 <= float(cells[5]) < 0.9 and cells[6:] == ["0", "0.00", "0.00"], result.stdout


def test_choose_stop_rule_scores_by_dice_what_the_area_score_keeps(tmp_path):
    """Two slices inside the object segmented wrongly (no pixel on the reference; predicted IoU 0.6 there, 0.9 on the
    good slices, 0.4 past the ends): counting slices keeps them, since the reference has the object there; the Dice
    score drops them, as a user would want, and reports the Dice by hand: 2 x 261 / (290 + 370)."""

    def statistics(step):  # steps 11-17: the +1 direction
        return (0.6 if step in (13, 14) else 0.9 if step % 10 <= 4 else 0.4), 0.9

    def pixels(direction, step):
        if direction == 0:
            return 50, 45
        return (40, 0) if direction > 0 and step in (3, 4) else (40, 36) if step <= 4 else (40, 0)

    cells, result, _ = _best_stop_rule(tmp_path, statistics, "dice", pixels)
    assert 0.6 < float(cells[2]) <= 0.9, result.stdout
    assert cells[6:] == [f"{2 * 261 / 660:.4f}", f"1: {2 * 261 / 660:.4f}", "0.00", "2.00"], result.stdout
    never = [line for line in result.stdout.splitlines() if line.startswith("| never stop")][0]
    assert never.count("|") == [line for line in result.stdout.splitlines() if line.startswith("| ")][1].count("|")
    by_area, _, _ = _best_stop_rule(tmp_path, statistics, "area", pixels)
    assert 0.4 < float(by_area[2]) <= 0.6 and by_area[6:] == ["0", "0.00", "0.00"], "counting slices keeps them"
    restarted = (tmp_path / "trace.csv").read_text() + "".join(
        f"{z},0,40,1.0,0.9,1.0,,1,a,click3,1,40,36,370\n" for z in (3, 12)
    )  # a click3 object started again on a second slice by a corrective click
    (tmp_path / "restarted.csv").write_text(restarted)
    both = _choose(str(tmp_path / "restarted.csv"))
    assert both.returncode == 0 and both.stdout.startswith("key: 1 objects from restarted.csv"), both.stdout
    assert "click3: 1 objects from restarted.csv: left out, some objects start on several slices" in both.stdout
    trace = tmp_path / "old.csv"
    trace.write_text((tmp_path / "trace.csv").read_text().replace(",predicted_area", ",other"))
    refused = _choose(str(trace))
    assert refused.returncode == 1 and "has no predicted_area column" in refused.stderr, refused.stderr


def test_runtime_table_reads_speed_ups_against_the_first_runtime(tmp_path):

    spec = importlib.util.spec_from_file_location("benchmark_runtimes", SCRIPT.parent / "benchmark_runtimes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [
        {"measure": "encoder", "runtime": "eager", "seconds": 2.0},
        {"measure": "encoder", "runtime": "torch", "seconds": 0.5},
        {"measure": "case", "runtime": "eager", "seconds": 30.0, "dice": 0.8, "agreement": 1.0},
        {"measure": "case", "runtime": "torch", "seconds": 10.0, "dice": 0.7, "agreement": 0.9},
    ]
    text = module.write_table(rows, ["eager", "torch"], tmp_path / "table.md")
    assert "| encoder (1) | 2.000 | 0.500 | 4.00x | - / - | - |" in text
    assert "| case (1) | 30.000 | 10.000 | 3.00x | 0.8000 / 0.7000 | 0.9000 (min) |" in text
    assert (tmp_path / "table.md").read_text() == text
