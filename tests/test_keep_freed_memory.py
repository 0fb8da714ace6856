"""`funcdp.performance.keep_freed_memory`: freed memory is reused, not page-faulted in again.

Each case runs in its own Python process: the setting is process-wide."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

_CYCLES = """
import json, resource, sys, torch
from funcdp.performance import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(6):  # a step's large temporaries: 64 MiB, filled, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 << 20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""


def _run(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CYCLES, mode], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    plain, kept = _run("plain"), _run("keep")
    assert kept["kept"] is True
    pages = (64 << 20) // 4096
    assert min(plain["faults"][-2:]) > pages // 2  # each cycle maps its 64 MiB afresh
    assert max(kept["faults"][-2:]) < pages // 100  # once the heap has grown, it serves them
