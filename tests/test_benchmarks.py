"""The benchmarks run and print their tables (smoke sizes; no timing is asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script, *args, timeout=600):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_overhead_benchmark_smoke_prints_the_table():
    out = _run("overhead.py", "--smoke", "--models", "mlp_tiny", "--scaling")
    assert ("| model | config | ms/step | x bare | ms/step in its hooks | 1 + hooks/bare | host reads/step (added) "
            "| aten ops/step added |") in out
    for config in ("bare", "lightning_grad_norm", "gradient_monitor", "bpkit_default", "bpkit_full"):
        assert f"| {config} |" in out
    scaling = [line for line in out.splitlines() if line.startswith(("| 10 |", "| 50 |", "| 200 |"))]
    added = [float(line.split("|")[4]) for line in scaling]
    assert len(added) == 3 and max(added) == min(added), "ops per step must not grow with the number of tensors"


@pytest.mark.slow
@pytest.mark.parametrize("script", ["clip_overhead.py", "activation_overhead.py", "gradcheck_cost.py",
                                    "tbptt_memory.py", "curvature_cost.py", "nan_origin.py",
                                    "noise_scale_cost.py"])
def test_other_benchmarks_smoke(script):
    assert _run(script, "--smoke").strip()
