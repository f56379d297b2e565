# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Choose the prompt engine's stop rule from a trace of unstopped propagation on the dev split.

Record the trace first, with a rule that never stops (propagation then runs to the volume's ends and every slice's
statistics are kept)::

    python scripts/benchmark_prompts.py --protocols key --stop-area 0 --stop-iou -1 --stop-overlap 0 --trace \\
        --output-dir prompt_trace
    python scripts/choose_stop_rule.py prompt_trace/trace.csv

A stricter rule keeps exactly a prefix of each direction's slices (propagation is deterministic up to the slice
where it stops), so every candidate rule can be scored on the trace without running the model again. Two scores:

- ``--score dice`` (default): the mean volume Dice the objects would get, from the trace's pixel counts (a kept
  slice adds its predicted and overlapping pixels; the reference counts whole): the figure users see, where a slice
  kept inside the reference but segmented badly costs what it costs them.
- ``--score area``: the predicted area on slices outside the reference that the rule keeps plus the area on slices
  inside it that the rule drops (an area-weighted count of wrong slices; also for traces without pixel counts).

The table lists the best rules with their wrong slices. Record the trace with the overlap test off
(``--stop-overlap 0``, and ``--stop-overlap-roi 0`` for ROIs) so that the grid can score ``overlap after`` (the
slices next to the start where the overlap test does not apply) as well. Each protocol of the trace gets its own
table: in the ``roi`` table the grid's overlap stands for the ROI's (``--stop-overlap-roi``). Objects restarted by
corrective clicks (``click3``) have several start slices and are left out.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path

AREAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
GROWTHS = (0.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
IOUS = (-1.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
OVERLAPS = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9)
#: slices next to the start where the overlap test does not apply (``StopRule.overlap_after``)
OVERLAP_AFTERS = (0, 1, 2, 3)
#: the trace columns ``--score dice`` adds up (``benchmark_prompts.py --trace`` writes them)
PIXEL_COLUMNS = ("predicted_area", "intersection", "label_voxels")


def directions(rows: list[dict]) -> list[list[dict]]:
    """The trace split into propagation directions, each ordered outward from its start slice (start excluded)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if int(row["direction"]) == 0:
            continue
        key = (row["case"], row["protocol"], row["label"], int(row["direction"]))
        groups.setdefault(key, []).append(row)
    return [sorted(group, key=lambda r: int(r["slice"]) * int(r["direction"])) for group in groups.values()]


def objects(rows: list[dict]) -> list[tuple[dict, list[list[dict]]]]:
    """The trace per object (case, protocol, label): its start row and its directions (see :func:`directions`)."""
    starts = {(r["case"], r["protocol"], r["label"]): r for r in rows if int(r["direction"]) == 0}
    walks: dict[tuple, list[list[dict]]] = {key: [] for key in starts}
    for walk in directions(rows):
        key = (walk[0]["case"], walk[0]["protocol"], walk[0]["label"])
        if key in walks:
            walks[key].append(walk)
    return [(starts[key], walks[key]) for key in starts]


def fires(row: dict, distance: int, area: float, growth: float, iou: float, overlap: float, after: int) -> bool:
    """Whether the rule ends its direction on ``row``, ``distance`` slices from the start (as ``StopRule`` does)."""
    return (
        int(row["area"]) == 0
        or float(row["area_fraction"]) < area
        or (growth > 0 and float(row["area_fraction"]) > growth)
        or float(row["iou"]) < iou
        or (distance > after and float(row["overlap"]) < overlap)
    )


def score(
    walks: list[list[dict]], area: float, growth: float, iou: float, overlap: float, overlap_after: int = 0
) -> tuple[float, int, int]:
    """Area-weighted error, wrongly kept slices and wrongly dropped slices of one rule over every direction.

    ``overlap_after``: the overlap test applies only past this many slices from the start (``StopRule``).
    """
    cost, kept_out, dropped_in = 0.0, 0, 0
    for walk in walks:
        stopped = False
        for distance, row in enumerate(walk, start=1):
            stopped = stopped or fires(row, distance, area, growth, iou, overlap, overlap_after)
            inside = int(row["in_reference"]) == 1
            if stopped and inside:
                cost, dropped_in = cost + float(row["area"]), dropped_in + 1
            elif not stopped and not inside:
                cost, kept_out = cost + float(row["area"]), kept_out + 1
    return cost, kept_out, dropped_in


def dice_score(
    traced: list[tuple[dict, list[list[dict]]]],
    area: float,
    growth: float,
    iou: float,
    overlap: float,
    overlap_after: int = 0,
) -> tuple[float, dict[str, float], int, int]:
    """Mean volume Dice over the objects of ``traced`` (:func:`objects`) under one rule, the mean per label, and the
    wrongly kept and wrongly dropped slices. An object's Dice is twice the overlapping pixels of its kept slices (the
    start slice always) over their predicted pixels plus the label's reference voxels."""
    per_label: dict[str, list[float]] = {}
    kept_out = dropped_in = 0
    for start, walks in traced:
        predicted, overlapping = float(start["predicted_area"]), float(start["intersection"])
        for walk in walks:
            stopped = False
            for distance, row in enumerate(walk, start=1):
                stopped = stopped or fires(row, distance, area, growth, iou, overlap, overlap_after)
                inside = int(row["in_reference"]) == 1
                if stopped:
                    dropped_in += inside
                    continue
                kept_out += not inside
                predicted += float(row["predicted_area"])
                overlapping += float(row["intersection"])
        total = predicted + float(start["label_voxels"])
        per_label.setdefault(start["label"], []).append(2.0 * overlapping / total if total else 1.0)
    everything = [d for values in per_label.values() for d in values]
    means = {label: sum(values) / len(values) for label, values in sorted(per_label.items())}
    return sum(everything) / max(len(everything), 1), means, kept_out, dropped_in


def main(argv: Sequence[str] | None = None) -> int:
    """Score every rule of the grid; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", help="trace.csv from benchmark_prompts.py --trace (with an in_reference column)")
    parser.add_argument("--top", type=int, default=10, help="rules to list (default 10)")
    parser.add_argument(
        "--score",
        choices=("dice", "area"),
        default="dice",
        help="rank rules by the mean volume Dice they give (default) or by the area on wrongly kept and dropped slices",
    )
    args = parser.parse_args(argv)
    try:
        with open(args.trace, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as err:
        print(f"error: trace '{args.trace}' could not be read ({err.strerror}).", file=sys.stderr)
        return 1
    if not rows or "in_reference" not in rows[0]:
        print(f"error: '{args.trace}' has no in_reference column: record it with benchmark_prompts.py --trace.",
              file=sys.stderr)  # fmt: skip
        return 1
    missing = [c for c in PIXEL_COLUMNS if c not in rows[0]]
    if args.score == "dice" and missing:
        print(f"error: '{args.trace}' has no {missing[0]} column, which --score dice adds up: record it again with "
              "benchmark_prompts.py --trace, or score it with --score area.", file=sys.stderr)  # fmt: skip
        return 1
    grid = itertools.product(AREAS, GROWTHS, IOUS, OVERLAPS, OVERLAP_AFTERS)
    # overlap_after changes nothing without an overlap test: those rules are scored once
    rules = [rule for rule in grid if rule[3] > 0 or rule[4] == 0]
    never = (0.0, 0.0, -1.0, 0.0, 0)
    blocks = []
    for protocol in dict.fromkeys(r["protocol"] for r in rows):  # one table per protocol: their rules differ
        own = [r for r in rows if r["protocol"] == protocol]
        starts = [(r["case"], r["label"]) for r in own if int(r["direction"]) == 0]
        head = f"{protocol}: {len(set(starts))} objects from {Path(args.trace).name}"
        if len(starts) != len(set(starts)):
            blocks.append(f"{head}: left out, some objects start on several slices (corrective clicks), and a rule "
                          "cannot be scored on a walk that another start's masks meet.")  # fmt: skip
            continue
        if args.score == "dice":
            lines = dice_table(objects(own), rules, never, args.top)
        else:
            lines = area_table(directions(own), rules, never, args.top)
        blocks.append("\n".join([head, "", *lines]))
    print("\n\n".join(blocks))
    return 0


_HEAD = "| min area fraction | max area fraction | min predicted IoU | min overlap | overlap after | "


def area_table(walks: list[list[dict]], rules: list[tuple], never: tuple, top: int) -> list[str]:
    """Markdown rows of the best ``top`` rules by :func:`score` (lowest error first), then the rule that never
    stops."""
    n = len({(w[0]["case"], w[0]["protocol"], w[0]["label"]) for w in walks}) or 1
    lines = [_HEAD + "area-weighted error | FP slices / object | missed slices / object |", "|---:" * 8 + "|"]
    for (cost, kept_out, dropped_in), (a, g, i, o, k) in sorted((score(walks, *rule), rule) for rule in rules)[:top]:
        lines.append(f"| {a} | {g} | {i} | {o} | {k} | {cost:.0f} | {kept_out / n:.2f} | {dropped_in / n:.2f} |")
    cost, kept_out, dropped_in = score(walks, *never)
    lines.append(f"| never stop | | | | | {cost:.0f} | {kept_out / n:.2f} | {dropped_in / n:.2f} |")
    return lines


def dice_table(traced: list[tuple[dict, list[list[dict]]]], rules: list[tuple], never: tuple, top: int) -> list[str]:
    """Markdown rows of the best ``top`` rules by :func:`dice_score` (highest mean Dice first, per label after it),
    then the rule that never stops."""
    n = len(traced) or 1
    lines = [_HEAD + "mean Dice | Dice per label | FP slices / object | missed slices / object |", "|---:" * 9 + "|"]

    def row(cells: str, result: tuple[float, dict[str, float], int, int]) -> str:
        mean, per_label, kept_out, dropped_in = result
        labels = " / ".join(f"{label}: {value:.4f}" for label, value in per_label.items())
        return f"{cells} | {mean:.4f} | {labels} | {kept_out / n:.2f} | {dropped_in / n:.2f} |"

    scored = sorted(((dice_score(traced, *rule), rule) for rule in rules), key=lambda item: -item[0][0])
    listed: list[tuple] = []
    for result, (a, g, i, o, k) in scored:
        if result in listed:  # the same slices kept as a rule above: the first of them stands for all
            continue
        if len(listed) == top:
            break
        listed.append(result)
        lines.append(row(f"| {a} | {g} | {i} | {o} | {k}", result))
    lines.append(row("| never stop | | | |", dice_score(traced, *never)))
    lines += ["", "Rules that keep the same slices as a listed one are left out (the grid's first of them is shown)."]
    return lines


if __name__ == "__main__":
    sys.exit(main())
