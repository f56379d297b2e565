# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Sweep the coefficient learning rate and parametrization through the bundle, on the dev validation split.

Each run fine-tunes one method preset (``configs/methods``) with ``bundle/configs/train.json`` and the hippocampus
dataset preset, at one coefficient learning rate and parametrization, then evaluates its checkpoint with
``evaluate.json`` (label boxes on every slice) on the validation split of the data in ``--dataset-dir`` (the dev
split: never point it at held-out cases). The zero-shot model and ``decoder_only`` are the reference rows. Runs whose
trunk is frozen (paper preset, decoder-only, zero-shot) share one trunk feature cache, so the trunk runs once per
slice for all of them. Every finished run is appended to ``sweep.csv`` with the coefficient movement its checkpoint
recorded; ``--resume`` skips the runs already there, so a sweep cut off by a time limit goes on where it stopped.
Training draws the bundle's prompt shares (clicks, mask prompts) unless ``--train-click-fraction`` /
``--train-mask-prompt-fraction`` pin them; each run records the shares it trained with.

    python scripts/sweep_coefficients.py --methods coefficients_paper parser_paper --steps 80 \\
        --learning-rates 1e-4 1e-3 3e-3 1e-2 3e-2 --parametrizations additive relative --output-dir sweep
    python scripts/sweep_coefficients.py --plot-only --output-dir sweep    # the plot and the table from sweep.csv
"""

from __future__ import annotations

import argparse
import csv
import gc
import itertools
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from samparser_monai.benchmarks.comparison import (
    ZERO_SHOT,
    add_training_prompt_arguments,
    run_bundle,
    summarise_metrics,
    training_prompts,
)
from samparser_monai.engines.workflow import latest_checkpoint
from samparser_monai.networks.trunk_cache import TrunkFeatureCache
from samparser_monai.process import retain_freed_host_memory

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "msd_hippocampus"
#: methods without SVD coefficients: run once per step budget, whatever the sweep's grid
REFERENCES = (ZERO_SHOT, "decoder_only")
FIELDS = ["method", "parametrization", "coefficient_lr", "steps", "seed", "click_fraction", "mask_fraction", "label",
          "label_name", "cases", "dice", "dice_sd", "hd95", "mean_dice", "moved_median", "moved_max", "train_s",
          "eval_s"]  # fmt: skip
#: the training prompt shares of a run (``sweep.csv`` column -> ``train.json`` id); a ``sweep.csv`` written before
#: they were recorded trained on boxes alone (both 0, the bundle's defaults then)
PROMPT_FIELDS = {"click_fraction": "train_click_fraction", "mask_fraction": "train_mask_prompt_fraction"}


def run_key(row: dict) -> tuple:
    """What identifies one run in ``sweep.csv``."""
    return (
        row["method"],
        row["parametrization"],
        float(row["coefficient_lr"] or 0),
        int(row["steps"]),
        int(row["seed"]),
        *(float(row.get(field) or 0) for field in PROMPT_FIELDS),
    )


def prompts_label(row: dict) -> str:
    """How a run's training was prompted, for the table: ``boxes``, or the click and mask-prompt shares."""
    shares = {name: float(row.get(field) or 0) for name, field in (("clicks", "click_fraction"),
                                                                   ("masks", "mask_fraction"))}  # fmt: skip
    return ", ".join(f"{name} {share:g}" for name, share in shares.items() if share) or "boxes"


def planned_runs(args: argparse.Namespace) -> list[dict]:
    """The runs of the sweep, references first (they fill the shared trunk cache)."""
    runs = []
    shares = {field: args.prompts[key] for field, key in PROMPT_FIELDS.items()}
    for steps, seed in itertools.product(args.steps, args.seeds):
        for method in REFERENCES:
            if method in args.references and not (method == ZERO_SHOT and steps != args.steps[0]):
                runs.append(
                    {
                        "method": method,
                        "parametrization": "",
                        "coefficient_lr": 0.0,
                        "steps": steps,
                        "seed": seed,
                        **(dict.fromkeys(shares, 0.0) if method == ZERO_SHOT else shares),  # zero-shot: no training
                    }
                )
        for method, parametrization, lr in itertools.product(args.methods, args.parametrizations, args.learning_rates):
            runs.append(
                {
                    "method": method,
                    "parametrization": parametrization,
                    "coefficient_lr": lr,
                    "steps": steps,
                    "seed": seed,
                    **shares,
                }
            )
    return runs


def one_run(run: dict, args: argparse.Namespace, caches: dict[str, TrunkFeatureCache]) -> list[dict]:
    """Train (unless zero-shot) and evaluate one configuration; returns its rows (one per label)."""
    method = run["method"]
    preset = "decoder_only" if method == ZERO_SHOT else method
    bundle = ROOT / "bundle" / "configs"
    files = [bundle / "train.json", ROOT / "configs" / "datasets" / "msd_hippocampus.json"]
    files.append(ROOT / "configs" / "methods" / f"{preset}.json")
    name = f"{method}_{run['parametrization'] or 'ref'}_{run['coefficient_lr']:g}_{run['steps']}_{run['seed']}"
    if prompts_label(run) != "boxes":  # runs trained on boxes alone keep the folder names they always had
        name += "_" + prompts_label(run).replace(", ", "_").replace(" ", "")
    root = Path(args.output_dir) / "runs" / name
    overrides = {
        "bundle_root": str(root),
        "dataset_dir": str(args.dataset_dir),
        "seed": run["seed"],
        "epochs": 1,
        "samples_per_epoch": run["steps"] * args.batch_size,
        "batch_size": args.batch_size,
        "val_interval": 2,  # no validation while training: every run is scored by evaluate.json alike
        "use_tensorboard": False,
        "device": f"$torch.device('{args.device}')",
        "backbone": args.backbone,
        **{key: run[field] for field, key in PROMPT_FIELDS.items()},
    }
    if run["parametrization"]:
        overrides.update(
            coefficient_parametrization=run["parametrization"], coefficient_learning_rate=run["coefficient_lr"]
        )
    if args.val_cases:
        overrides["validate#datalist"] = f"$@datalists[1][:{args.val_cases}]"
    cache_bytes = int(args.cache_gb * (1 << 30))
    start = time.perf_counter()
    checkpoint, movement = None, {}
    if method != ZERO_SHOT:
        checkpoint = latest_checkpoint(root / "models") if args.reuse_checkpoints else None
        if checkpoint is None:
            for stale in root.glob("models/*.pt"):
                stale.unlink()
            run_bundle(files, overrides, "training", caches, cache_bytes)
            checkpoint = latest_checkpoint(root / "models")
        if checkpoint is None:
            raise RuntimeError(f"Training {name} saved no checkpoint in {root / 'models'}.")
        movement = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"].get(
            "coefficient_movement", {}
        )
    trained = time.perf_counter()
    gc.collect()
    evaluation = {**overrides, "eval_output_dir": str(root / "evaluation")}
    evaluation.update({"zero_shot": True} if checkpoint is None else {"eval_checkpoint": checkpoint})
    run_bundle([*files[:1], bundle / "evaluate.json", *files[1:]], evaluation, "evaluating", caches, cache_bytes)
    done = time.perf_counter()
    labels = summarise_metrics(root / "evaluation" / "metrics.csv")
    mean = statistics.fmean(r["dice"] for r in labels)
    movement = movement if isinstance(movement, dict) else {}
    moved = movement.get("all", {})
    return [
        {
            **run,
            "label": r["label"],
            "label_name": r["label_name"],
            "cases": r["cases"],
            "dice": round(r["dice"], 5),
            "dice_sd": round(r["dice_sd"], 5),
            "hd95": round(r["hd95"], 3),
            "mean_dice": round(mean, 5),
            "moved_median": moved.get("median", ""),
            "moved_max": moved.get("max", ""),
            "train_s": round(trained - start, 1),
            "eval_s": round(done - trained, 1),
        }  # fmt: skip
        for r in labels
    ]


def read_rows(path: Path) -> list[dict]:
    """The rows of ``sweep.csv`` (empty when it does not exist); columns it lacks (an older sweep) read as 0."""
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return [{**dict.fromkeys(PROMPT_FIELDS, "0"), **row} for row in csv.DictReader(handle)]


def upgrade_csv(path: Path) -> None:
    """Rewrite an older ``sweep.csv`` with today's columns (its runs trained on boxes alone), so rows append."""
    if not path.exists():
        return
    with open(path, newline="") as handle:
        header = next(csv.reader(handle), [])
    if header != FIELDS:
        rows = read_rows(path)
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)


def render(rows: list[dict]) -> str:
    """Markdown table: one row per run, mean Dice over labels, coefficient movement."""
    names = list(dict.fromkeys(r["label_name"] for r in rows))
    prompted = any(prompts_label(r) != "boxes" for r in rows)  # the column only where some run had other prompts
    lines = [
        "| method | parametrization | coefficient lr | steps | seed | "
        + ("training prompts | " if prompted else "")
        + "mean Dice | "
        + " | ".join(f"{n} Dice" for n in names)
        + " | moved: median | max |",
        "|---|---|---:|---:|---:|" + ("---|" if prompted else "") + "---:|" + "---:|" * len(names) + "---:|---:|",
    ]
    by_run: dict[tuple, list[dict]] = {}
    for row in rows:
        by_run.setdefault(run_key(row), []).append(row)
    for group in by_run.values():
        first = group[0]
        moved = (f"{float(first['moved_median']):.2%} | {float(first['moved_max']):.2%}"
                 if first["moved_median"] != "" else "- | -")  # fmt: skip
        lr = f"{float(first['coefficient_lr']):g}" if first["parametrization"] else "-"
        prompts = f"{prompts_label(first)} | " if prompted else ""
        lines.append(f"| {first['method']} | {first['parametrization'] or '-'} | {lr} | {first['steps']} | "
                     f"{first['seed']} | {prompts}{float(first['mean_dice']):.4f} | "
                     + " | ".join(f"{float(r['dice']):.4f}" for r in group) + f" | {moved} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def render_seeds(rows: list[dict]) -> str:
    """Markdown table over seeds: one row per configuration run with two seeds or more (its mean Dice over labels,
    mean and SD over seeds), with ``decoder_only`` at the same steps, training prompts and seeds beside it where the
    sweep has it (the mean and SD of the per-seed differences, and on how many seeds the configuration is ahead).
    Empty when no configuration has two seeds."""
    per_seed: dict[tuple, dict[int, float]] = {}
    for row in rows:
        key = run_key(row)
        per_seed.setdefault(key[:4] + key[5:], {})[int(row["seed"])] = float(row["mean_dice"])
    lines = []
    for (method, parametrization, lr, steps, clicks, masks), dice in per_seed.items():
        if len(dice) < 2 or method == "decoder_only":
            continue
        seeds = sorted(dice)
        values = [dice[s] for s in seeds]
        reference = per_seed.get(("decoder_only", "", 0.0, steps, clicks, masks), {})
        cells = ["-", "-", "-"]
        if all(s in reference for s in seeds):
            gains = [100 * (dice[s] - reference[s]) for s in seeds]
            cells = [f"{statistics.fmean(reference[s] for s in seeds):.4f} "
                     f"({statistics.stdev(reference[s] for s in seeds):.4f})",
                     f"{statistics.fmean(gains):+.2f} ({statistics.stdev(gains):.2f})",
                     f"{sum(g > 0 for g in gains)} of {len(gains)}"]  # fmt: skip
        prompts = prompts_label({"click_fraction": clicks, "mask_fraction": masks})
        lines.append(f"| {method} | {parametrization or '-'} | {f'{lr:g}' if parametrization else '-'} | {steps} | "
                     f"{prompts} | {' '.join(map(str, seeds))} | {statistics.fmean(values):.4f} "
                     f"({statistics.stdev(values):.4f}) | " + " | ".join(cells) + " |")  # fmt: skip
    if not lines:
        return ""
    head = ("| method | parametrization | coefficient lr | steps | training prompts | seeds "
            "| mean Dice (SD over seeds) | decoder_only, same seeds | difference, points (SD) | seeds ahead |\n"
            "|---|---|---:|---:|---|---|---:|---:|---:|---:|\n")  # fmt: skip
    return head + "\n".join(lines) + "\n"


def markdown(rows: list[dict]) -> str:
    """``sweep.md``'s text: every run, then the runs over seeds where there are some."""
    seeds = render_seeds(rows)
    return render(rows) + (f"\nOver seeds:\n\n{seeds}" if seeds else "")


def write_table(rows: list[dict], out: Path) -> None:
    """``sweep.md`` (:func:`markdown`) and ``sweep.png`` in ``out`` from the rows of ``sweep.csv``."""
    (out / "sweep.md").write_text(markdown(rows))
    plot(rows, out / "sweep.png")


def plot(rows: list[dict], path: Path) -> Path | None:
    """Mean Dice against the coefficient learning rate, one line per method and parametrization (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib).", file=sys.stderr)
        return None
    runs = {run_key(r): r for r in rows if r["seed"] == "0"}
    methods = sorted({r["method"] for r in runs.values() if r["parametrization"]})
    if not methods:
        return None
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 4), squeeze=False)
    references = [r for r in runs.values() if not r["parametrization"]]
    for ax, method in zip(axes[0], methods):
        lines = sorted({(r["parametrization"], r["steps"], prompts_label(r)) for r in runs.values()
                        if r["method"] == method and r["parametrization"]})  # fmt: skip
        for parametrization, steps, prompts in lines:
            picked = sorted(
                (float(r["coefficient_lr"]), float(r["mean_dice"]))
                for r in runs.values()
                if (r["method"], r["parametrization"], r["steps"], prompts_label(r))
                == (method, parametrization, steps, prompts)
            )
            style = "-" if parametrization == "relative" else "--"
            trained = "" if prompts == "boxes" else f", {prompts}"
            ax.plot(*zip(*picked), style, marker="o", label=f"{parametrization}, {steps} steps{trained}")
        for r in references:
            trained = "" if prompts_label(r) == "boxes" else f", {prompts_label(r)}"
            name = r["method"] if r["method"] == ZERO_SHOT else f"{r['method']} ({r['steps']} steps{trained})"
            ax.axhline(float(r["mean_dice"]), color="grey", lw=0.8, ls=":" if r["method"] == ZERO_SHOT else "-.")
            ax.annotate(name, (0.01, float(r["mean_dice"])), xycoords=("axes fraction", "data"), fontsize=7,
                        va="bottom")  # fmt: skip
        ax.set_xscale("log")
        ax.set_title(method)
        ax.set_xlabel("coefficient learning rate")
        ax.set_ylabel("mean 3D Dice (both labels)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["coefficients_paper", "parser_paper"],
                        help="method presets with coefficients (configs/methods)")  # fmt: skip
    parser.add_argument("--references", nargs="*", default=list(REFERENCES), choices=list(REFERENCES),
                        help="reference rows without coefficients")  # fmt: skip
    parser.add_argument("--learning-rates", nargs="+", type=float, default=[1e-4, 1e-3, 3e-3, 1e-2, 3e-2])
    parser.add_argument("--parametrizations", nargs="+", default=["additive", "relative"],
                        choices=["additive", "relative"])  # fmt: skip
    parser.add_argument("--steps", nargs="+", type=int, default=[80], help="training steps (one epoch)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--batch-size", type=int, default=2, help="slices per step (default 2)")
    parser.add_argument("--val-cases", type=int, default=0, help="validation cases (0: the whole validation split)")
    parser.add_argument("--backbone", default="lite_medsam")
    parser.add_argument("--dataset-dir", default=str(DEFAULT_DATA), help="the dev data (MSD layout)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache-gb", type=float, default=8.0, help="shared trunk feature cache budget")
    parser.add_argument("--output-dir", default="benchmark_results/sweep")
    parser.add_argument("--resume", action="store_true", help="skip the runs already in sweep.csv")
    parser.add_argument("--reuse-checkpoints", action="store_true",
                        help="score a run's existing checkpoint instead of training it again (a run whose evaluation "
                        "was cut off)")  # fmt: skip
    parser.add_argument("--plot-only", action="store_true", help="only write sweep.md and sweep.png from sweep.csv")
    add_training_prompt_arguments(parser)
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    csv_path = out / "sweep.csv"
    failed: list[str] = []  # runs of this sweep that failed (the others go on)
    try:
        if not args.plot_only:
            if not Path(args.dataset_dir).is_dir():
                raise FileNotFoundError(f"dataset '{args.dataset_dir}' does not exist: pass --dataset-dir <folder>.")
            out.mkdir(parents=True, exist_ok=True)
            args.prompts = training_prompts(args, ROOT)
            if not args.resume:
                csv_path.unlink(missing_ok=True)
            upgrade_csv(csv_path)
            done = {run_key(r) for r in read_rows(csv_path)}
            runs = [r for r in planned_runs(args) if run_key(r) not in done]
            retain_freed_host_memory(True)
            caches: dict[str, TrunkFeatureCache] = {}
            for run in tqdm(runs, desc="sweep", unit="run"):
                label = (f"{run['method']} {run['parametrization']} lr {run['coefficient_lr']:g} {run['steps']} steps, "
                         f"seed {run['seed']}, trained on {prompts_label(run)}")  # fmt: skip
                evicted = sum(cache.evictions for cache in caches.values())
                try:
                    rows = one_run(run, args, caches)
                except (ValueError, FileNotFoundError, OSError, RuntimeError) as err:  # the sweep goes on
                    failed.append(f"{label}: {err}")
                    tqdm.write(f"failed, skipped: {failed[-1]}")
                    continue
                new = not csv_path.exists()
                with open(csv_path, "a", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=FIELDS)
                    if new:
                        writer.writeheader()
                    writer.writerows(rows)
                write_table(read_rows(csv_path), out)  # never stale, even if the sweep is stopped here
                tqdm.write(f"{label}: mean Dice {rows[0]['mean_dice']:.4f}, moved median {rows[0]['moved_median']}")
                if evicted := sum(cache.evictions for cache in caches.values()) - evicted:
                    tqdm.write(f"The trunk cache was full: {evicted} features were dropped during this run and are "
                               f"computed again when needed; raise --cache-gb (now {args.cache_gb:g}) to keep a run's "
                               "training and validation slices together.")  # fmt: skip
        rows = read_rows(csv_path)
        if rows:
            write_table(rows, out)
            print(markdown(rows))
        if failed:
            raise RuntimeError(
                f"{len(failed)} of {len(runs)} runs failed (the table holds the others; rerun with --resume): "
                + "; ".join(failed)
            )
        if not rows:
            raise FileNotFoundError(f"{csv_path} holds no run yet: run the sweep first.")
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"results in {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
