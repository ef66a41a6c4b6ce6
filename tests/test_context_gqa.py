"""Grouped-query attention at context parallelism: every kind whose context path takes the
key/value groups equals one process's multi-head attention (k and v copied per query head) at
CP=2 and CP=4, forward and gradients in float64, and receives heads / groups times fewer bytes
where only keys and values cross (tests/context_gqa_driver.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, free_port


@pytest.mark.parametrize("n", [2, 4])
def test_grouped_kv_at_context_parallel_equals_one_process(n):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
           str(free_port()), str(REPO / "tests" / "context_gqa_driver.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    assert f"grouped-query attention at CP={n}: 13 cases equal one process" in proc.stdout
    assert "global: 2.00x" in proc.stdout and "local alibi dilations: 2.00x" in proc.stdout
