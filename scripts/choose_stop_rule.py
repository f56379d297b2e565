# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Choose the prompt engine's stop rule from a trace of unstopped propagation on the dev split.

Record the trace first, with a rule that never stops (propagation then runs to the volume's ends and every slice's
statistics are kept)::

    python scripts/benchmark_prompts.py --protocols key --stop-area 0 --stop-iou -1 --stop-overlap 0 --trace \\
        --output-dir prompt_trace
    python scripts/choose_stop_rule.py prompt_trace/trace.csv

A stricter rule keeps exactly a prefix of each direction's slices (propagation is deterministic up to the slice
where it stops), so every candidate rule can be scored on the trace without running the model again. The score is
the predicted area on slices outside the reference that the rule keeps plus the area on slices inside it that the
rule drops (an area-weighted count of wrong slices); the table lists the best rules with their wrong slices. Record
the trace with the overlap test off (``--stop-overlap 0``) so that the grid can score ``overlap after`` (the slices
next to the start where the overlap test does not apply) as well.
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


def directions(rows: list[dict]) -> list[list[dict]]:
    """The trace split into propagation directions, each ordered outward from its start slice (start excluded)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if int(row["direction"]) == 0:
            continue
        key = (row["case"], row["protocol"], row["label"], int(row["direction"]))
        groups.setdefault(key, []).append(row)
    return [sorted(group, key=lambda r: int(r["slice"]) * int(r["direction"])) for group in groups.values()]


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
            fires = (
                int(row["area"]) == 0
                or float(row["area_fraction"]) < area
                or (growth > 0 and float(row["area_fraction"]) > growth)
                or float(row["iou"]) < iou
                or (distance > overlap_after and float(row["overlap"]) < overlap)
            )
            stopped = stopped or fires
            inside = int(row["in_reference"]) == 1
            if stopped and inside:
                cost, dropped_in = cost + float(row["area"]), dropped_in + 1
            elif not stopped and not inside:
                cost, kept_out = cost + float(row["area"]), kept_out + 1
    return cost, kept_out, dropped_in


def main(argv: Sequence[str] | None = None) -> int:
    """Score every rule of the grid; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", help="trace.csv from benchmark_prompts.py --trace (with an in_reference column)")
    parser.add_argument("--top", type=int, default=10, help="rules to list (default 10)")
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
    walks = directions(rows)
    objects = len({(r["case"], r["protocol"], r["label"]) for r in rows})
    grid = itertools.product(AREAS, GROWTHS, IOUS, OVERLAPS, OVERLAP_AFTERS)
    # overlap_after changes nothing without an overlap test: those rules are scored once
    grid = (rule for rule in grid if rule[3] > 0 or rule[4] == 0)
    results = sorted((score(walks, *rule), rule) for rule in grid)
    lines = [f"{objects} objects, {len(walks)} directions from {Path(args.trace).name}", "",
             "| min area fraction | max area fraction | min predicted IoU | min overlap | overlap after | "
             "area-weighted error | FP slices / object | missed slices / object |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for (cost, kept_out, dropped_in), (a, g, i, o, n) in results[: args.top]:
        lines.append(f"| {a} | {g} | {i} | {o} | {n} | {cost:.0f} | {kept_out / objects:.2f} | "
                     f"{dropped_in / objects:.2f} |")  # fmt: skip
    never = score(walks, 0.0, 0.0, -1.0, 0.0)
    lines.append(f"| never stop | | | | | {never[0]:.0f} | {never[1] / objects:.2f} | {never[2] / objects:.2f} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
