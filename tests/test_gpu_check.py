"""``benchmarks/gpu_check.sh --device cpu --quick``: every step of the GPU script runs and
writes its results (the script is otherwise only run on a lent GPU machine)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_script_runs_on_cpu(tmp_path):
    env = {**os.environ, "RESULTS": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--quick"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "passed" in (tmp_path / "precision_cpu_quick.log").read_text()
    for name in ("meta_step_cpu_quick", "meta_step_cpu_quick_tf32", "meta_step_cpu_quick_cudnn_benchmark",
                 "decomposition_cost_cpu_quick", "precision_cpu_quick", "memory_cpu_quick"):
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["rows"], name
    grid = json.loads((tmp_path / "meta_step_cpu_quick.json").read_text())
    errors = [m["error_vs_float64"] for row in grid["rows"] for m in row["methods"].values()]
    assert errors and all(0 < e < 1e-3 for e in errors)
    assert json.loads((tmp_path / "meta_step_cpu_quick_tf32.json").read_text())["environment"]["tf32"] is True
