# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Retaining freed host memory: a block freed by a CPU tensor is reused without page faults, only when asked."""

from __future__ import annotations

import subprocess
import sys

import pytest

from samparser_monai.process import _glibc, retain_freed_host_memory

# Allocates, writes and frees a 64 MiB tensor 10 times, as a training step does its activations, and prints the minor
# page faults of the last round (glibc settles on reusable blocks within a few rounds).
_PROBE = """
import resource, sys, torch
from samparser_monai.process import retain_freed_host_memory
print(retain_freed_host_memory(sys.argv[1] == "1"))
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(16 << 20)
    del block
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _last_round_faults(retain: bool) -> tuple[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, "1" if retain else "0"], capture_output=True, text=True, check=True, timeout=120
    )
    applied, faults = done.stdout.split()
    return applied, int(faults)


def test_disabled_changes_nothing():
    assert retain_freed_host_memory(enabled=False) is False


@pytest.mark.skipif(_glibc() is None, reason="the setting applies to glibc on Linux only")
def test_freed_block_is_reused_without_page_faults():
    applied, faults = _last_round_faults(retain=True)
    assert applied == "True"
    assert faults < 1000, f"a 64 MiB block freed and asked for again, the 10th time, faulted {faults} pages"
    applied, faults = _last_round_faults(retain=False)
    assert applied == "False"
    assert faults > 10_000, "without the setting glibc returns the block to the system and the next one faults anew"
