"""benchmarks/gpu_check.py in its reduced CPU mode: every check runs (so the GPU script
cannot rot between GPU windows) and, without CUDA, every row says SKIPPED."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine run the full check")
def test_reduced_cpu_mode_runs_every_check(tmp_path):
    out = tmp_path / "gpu_check.md"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu_check.py"),
            "--cpu-reduced",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    table = out.read_text()
    assert "CPU only" in table and "GPU rows SKIPPED" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 16, table
    for row in rows:
        assert "| SKIPPED (no GPU) |" in row, row  # measured on CPU, but never a verdict
    assert "FAIL" not in done.stdout
    assert "resumed at epoch 2" in table
    # the CUDA-graph rows exist (compiling is for the GPU run) and the real trainer ran
    assert sum("torch.compile reduce-overhead (CUDA graphs)" in row for row in rows) == 2
    trainer_eager = next(row for row in rows if row.startswith("| trainer ") and "eager" in row)
    assert re.search(r"[0-9.]+ img/s over \d+ steps", trainer_eager), trainer_eager
    assert sum(row.startswith("| extraction resnet18 48x16, batch 8") for row in rows) == 2
    # re-ranking: the float64 row compares both passes with the CPU reference; on a CPU-only
    # machine they run on the CPU, so they agree to float64 rounding
    float64_row = next(row for row in rows if "re-ranking" in row and "float64" in row)
    assert float(re.search(r"max abs diff ([0-9.e+-]+)", float64_row).group(1)) <= 1e-12, (
        float64_row
    )
    float32_row = next(row for row in rows if "re-ranking" in row and "float32" in row)
    assert "differ from the cpu: full 0, bf16 0 of 300 (max 0.0e+00)" in float32_row, float32_row
