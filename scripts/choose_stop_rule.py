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

from tqdm import tqdm

from samparser_monai.engines.stop_rule import StopRule

AREAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
GROWTHS = (0.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
IOUS = (-1.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
OVERLAPS = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9)
#: slices next to the start where the overlap test does not apply (``StopRule.overlap_after``)
OVERLAP_AFTERS = (0, 1, 2, 3)
#: the share of a mask on another object's mask above which its direction ends (``StopRule.max_claimed``, 0: off)
CLAIMS = (0.0, 0.3, 0.5, 0.7)
#: the trace columns ``--score dice`` adds up (``benchmark_prompts.py --trace`` writes them)
PIXEL_COLUMNS = ("predicted_area", "intersection", "label_voxels")

#: one rule of the grid: (min area fraction, max area fraction, min IoU, min overlap, overlap after, max claimed)
Rule = tuple[float, float, float, float, int, float]
#: the :class:`StopRule` field of each place of a :data:`Rule`
RULE_FIELDS = ("min_area_fraction", "max_area_fraction", "min_iou", "min_overlap", "overlap_after", "max_claimed")
#: one traced slice as the scores read it: (area, area fraction, IoU, overlap, claimed, inside the reference,
#: predicted pixels, overlapping pixels)
Step = tuple[int, float, float, float, float, bool, float, float]


def directions(rows: list[dict]) -> list[list[dict]]:
    """The trace split into propagation directions, each ordered outward from its start slice (start excluded)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if int(row["direction"]) == 0:
            continue
        key = (row["case"], row["protocol"], row["label"], int(row["direction"]))
        groups.setdefault(key, []).append(row)
    return [sorted(group, key=lambda r: int(r["slice"]) * int(r["direction"])) for group in groups.values()]


def steps(walk: list[dict]) -> list[Step]:
    """A direction's rows as numbers (a trace without ``claimed`` or pixel counts reads 0 there)."""
    return [
        (int(r["area"]), float(r["area_fraction"]), float(r["iou"]), float(r["overlap"]), float(r.get("claimed") or 0),
         int(r["in_reference"]) == 1, float(r.get("predicted_area") or 0), float(r.get("intersection") or 0))
        for r in walk
    ]  # fmt: skip


def objects(rows: list[dict]) -> list[tuple[dict, list[list[Step]]]]:
    """The trace per object (case, protocol, label): its start row and its directions (:func:`directions`, as
    :func:`steps`)."""
    starts = {(r["case"], r["protocol"], r["label"]): r for r in rows if int(r["direction"]) == 0}
    walks: dict[tuple, list[list[Step]]] = {key: [] for key in starts}
    for walk in directions(rows):
        key = (walk[0]["case"], walk[0]["protocol"], walk[0]["label"])
        if key in walks:
            walks[key].append(steps(walk))
    return [(starts[key], walks[key]) for key in starts]


def stop_rule(rule: Rule) -> StopRule:
    """The :class:`StopRule` of one grid rule (in an ``roi`` table its overlap stands for ``roi_min_overlap``)."""
    return StopRule(**dict(zip(RULE_FIELDS, rule)))


def kept(walk: list[Step], rule: StopRule) -> int:
    """How many slices of ``walk`` the rule keeps: those before the first where :meth:`StopRule.stops` fires, or the
    mask is empty, as in the engine (the claimed share is the unstopped trace's, so that test is an estimate where
    another object's stop moves it)."""
    for distance, (pixels, fraction, predicted_iou, on_previous, on_others, *_) in enumerate(walk, start=1):
        if pixels == 0 or rule.stops(fraction, predicted_iou, on_previous, distance, on_others):
            return distance - 1
    return len(walk)


def score(walks: list[list[Step]], rule: Rule) -> tuple[float, int, int]:
    """Area-weighted error, wrongly kept slices and wrongly dropped slices of one rule over every direction."""
    cost, kept_out, dropped_in = 0.0, 0, 0
    stop = stop_rule(rule)
    for walk in walks:
        n = kept(walk, stop)
        for i, (pixels, *_, inside, _, _) in enumerate(walk):
            if i >= n and inside:
                cost, dropped_in = cost + pixels, dropped_in + 1
            elif i < n and not inside:
                cost, kept_out = cost + pixels, kept_out + 1
    return cost, kept_out, dropped_in


def dice_score(traced: list[tuple[dict, list[list[Step]]]], rule: Rule) -> tuple[float, dict[str, float], int, int]:
    """Mean volume Dice over the objects of ``traced`` (:func:`objects`) under one rule, the mean per label, and the
    wrongly kept and wrongly dropped slices. An object's Dice is twice the overlapping pixels of its kept slices (the
    start slice always) over their predicted pixels plus the label's reference voxels."""
    per_label: dict[str, list[float]] = {}
    kept_out = dropped_in = 0
    stop = stop_rule(rule)
    for start, walks in traced:
        predicted, overlapping = float(start["predicted_area"]), float(start["intersection"])
        for walk in walks:
            n = kept(walk, stop)
            for i, (*_, inside, pixels, common) in enumerate(walk):
                if i >= n:
                    dropped_in += inside
                    continue
                kept_out += not inside
                predicted, overlapping = predicted + pixels, overlapping + common
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
    grid = itertools.product(AREAS, GROWTHS, IOUS, OVERLAPS, OVERLAP_AFTERS, CLAIMS)
    # overlap_after changes nothing without an overlap test: those rules are scored once
    rules = [rule for rule in grid if rule[3] > 0 or rule[4] == 0]
    never = (0.0, 0.0, -1.0, 0.0, 0, 0.0)
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
            walks = [steps(walk) for walk in directions(own)]
            lines = area_table(walks, rules, never, args.top, len(starts))
        blocks.append("\n".join([head, "", *lines]))
    print("\n\n".join(blocks))
    return 0


_HEAD = "| min area fraction | max area fraction | min predicted IoU | min overlap | overlap after | max claimed | "


def area_table(walks: list[list[Step]], rules: list[Rule], never: Rule, top: int, n: int) -> list[str]:
    """Markdown rows of the best ``top`` rules by :func:`score` (lowest error first), then the rule that never
    stops; ``n`` objects."""
    n = max(n, 1)
    lines = [_HEAD + "area-weighted error | FP slices / object | missed slices / object |", "|---:" * 9 + "|"]
    progress = tqdm(rules, desc="rules", unit="rule", file=sys.stderr, leave=False)
    for (cost, kept_out, dropped_in), rule in sorted((score(walks, rule), rule) for rule in progress)[:top]:
        cells = " | ".join(str(v) for v in rule)
        lines.append(f"| {cells} | {cost:.0f} | {kept_out / n:.2f} | {dropped_in / n:.2f} |")
    cost, kept_out, dropped_in = score(walks, never)
    lines.append(f"| never stop | | | | | | {cost:.0f} | {kept_out / n:.2f} | {dropped_in / n:.2f} |")
    return lines


def dice_table(traced: list[tuple[dict, list[list[Step]]]], rules: list[Rule], never: Rule, top: int) -> list[str]:
    """Markdown rows of the best ``top`` rules by :func:`dice_score` (highest mean Dice first, per label after it),
    then the rule that never stops."""
    n = len(traced) or 1
    lines = [_HEAD + "mean Dice | Dice per label | FP slices / object | missed slices / object |", "|---:" * 10 + "|"]

    def row(cells: str, result: tuple[float, dict[str, float], int, int]) -> str:
        mean, per_label, kept_out, dropped_in = result
        labels = " / ".join(f"{label}: {value:.4f}" for label, value in per_label.items())
        return f"{cells} | {mean:.4f} | {labels} | {kept_out / n:.2f} | {dropped_in / n:.2f} |"

    progress = tqdm(rules, desc="rules", unit="rule", file=sys.stderr, leave=False)
    scored = sorted(((dice_score(traced, rule), rule) for rule in progress), key=lambda item: -item[0][0])
    listed: list[tuple] = []
    for result, rule in scored:
        if result in listed:  # the same slices kept as a rule above: the first of them stands for all
            continue
        if len(listed) == top:
            break
        listed.append(result)
        lines.append(row("| " + " | ".join(str(v) for v in rule), result))
    lines.append(row("| never stop | | | | |", dice_score(traced, never)))
    lines += ["", "Rules that keep the same slices as a listed one are left out (the grid's first of them is shown)."]
    return lines


if __name__ == "__main__":
    sys.exit(main())
