"""bench/memory_budget.py: the batch search and the CPU peak-memory reading it relies on."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import memory_budget  # noqa: E402


def _args(**options) -> argparse.Namespace:
    defaults = {"budget_mb": 1000.0, "start": 8, "max_batch": 4096, "tolerance": 0.0}
    return argparse.Namespace(**{**defaults, **options})


def _fake_tries(monkeypatch, record_of):
    tried = []

    def fake(model, engine, batch, args):
        tried.append(batch)
        return record_of(batch)

    monkeypatch.setattr(memory_budget, "_try", fake)
    return tried


def test_search_finds_the_exact_largest_batch_under_a_linear_cost(monkeypatch):
    tried = _fake_tries(monkeypatch, lambda b: {"peak_mb": 10.0 * b})
    assert memory_budget.largest_batch("m", "e", _args()) == (100, 1000.0)
    assert tried[:5] == [8, 16, 32, 64, 128]  # doubling, then bisection between 64 and 128
    assert 101 in tried


def test_search_within_tolerance_stops_early_and_still_fits(monkeypatch):
    tried = _fake_tries(monkeypatch, lambda b: {"peak_mb": 10.0 * b})
    batch, peak = memory_budget.largest_batch("m", "e", _args(tolerance=0.25))
    assert 100 * 0.75 <= batch <= 100 and peak <= 1000.0
    assert len(tried) < 5 + 6


def test_out_of_memory_and_watchdog_mean_no_fit_other_errors_fail_the_engine(monkeypatch):
    def record(b):
        if b < 40:
            return {"peak_mb": 1.0}
        if b < 64:
            return {"over_budget": True}
        return {"error": "RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried"}

    _fake_tries(monkeypatch, record)
    assert memory_budget.largest_batch("m", "e", _args())[0] == 39
    _fake_tries(monkeypatch, lambda b: {"error": "NotImplementedError: Parameter tying"})
    assert memory_budget.largest_batch("m", "e", _args()) == "failed: NotImplementedError: " + (
        "Parameter tying"
    )


def test_search_stops_at_max_batch(monkeypatch):
    _fake_tries(monkeypatch, lambda b: {"peak_mb": 1.0})
    assert memory_budget.largest_batch("m", "e", _args(max_batch=100)) == (64, 1.0)


_PEAK_READING = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import memory_budget
torch.ones(40 * 2**20 // 4)  # a 40 MiB peak before the reset must not count
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")
base = memory_budget._status_kb("VmRSS")
after_reset = memory_budget._status_kb("VmHWM") - base
torch.ones(24 * 2**20 // 4)  # freed at once: only the peak remembers it
print(after_reset, memory_budget._status_kb("VmHWM") - base)
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="Linux /proc only")
def test_peak_resident_set_reset_then_grows_by_a_transient_allocation():
    """In a fresh process, as each try runs (in this one, earlier tests leave freed memory that
    the allocator reuses without the resident set growing)."""
    bench = str(Path(memory_budget.__file__).parent)
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_READING, bench], capture_output=True, text=True, check=True
    )
    after_reset, peak = (int(v) for v in out.stdout.split())
    assert after_reset < 8 * 1024
    assert 23 * 1024 <= peak < 40 * 1024
