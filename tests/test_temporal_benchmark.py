"""benchmarks/temporal_overhead.py runs and prints its table (smoke sizes; no timing is asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_temporal_overhead_benchmark_smoke_prints_the_table():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "temporal_overhead.py"), "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| model | setting | ms/step (median) |" in out
    for setting in ("bare", "cadence 50 (Lightning default)", "cadence 10 (bpkit-train)", "every step"):
        assert out.count(f"| {setting} |") == 4, setting
    assert "time/grad/<m> image" in out
