"""The benchmarks that CI can keep alive: bench/gpu.py's dry run on the CPU (small shapes, seconds)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_benchmark_dry_run_writes_its_table(tmp_path):
    results = tmp_path / "RESULTS.md"
    command = [sys.executable, "bench/gpu.py", "--dry-run", "--layers", "2", "--workdir", str(tmp_path / "work"),
               "--results", str(results)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    section = results.read_text()
    rows = [line for line in section.splitlines() if line.startswith(("| wanda", "| sparsegpt", "| gblm"))]
    assert len(rows) == 4
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert float(cells[1]) > 0  # seconds a layer
        assert cells[-1] != "" and float(cells[-2]) > 0  # the plan's peak
    assert "GBLM's gradient pass" in section
