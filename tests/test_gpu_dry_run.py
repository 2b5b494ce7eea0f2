"""The CUDA tests, run with the CPU standing in for the GPU.

tests/test_gpu.py runs only where a GPU is lent, which is rarely; without this check a change
to the code under test can break those tests unnoticed (it happened: the CPU cache began to
record its channels-last layout, and the GPU test still expected the old ``numerics``). The
numbers compared here are CPU against CPU: this checks the tests' calls and expectations, not
CUDA's rounding.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def test_the_gpu_tests_pass_with_the_cpu_standing_in_for_cuda(tmp_path):
    env = {**os.environ, "INTERPTOOL_GPU_DRY_RUN": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", str(TESTS / "test_gpu.py"), "-q", "-p", "no:cacheprovider",
         "-p", "no:randomly", "-o", "addopts=", "--basetemp", str(tmp_path / "t")],
        capture_output=True, text=True, env=env, cwd=TESTS.parent, timeout=600)
    tail = (run.stdout + run.stderr)[-3000:]
    assert run.returncode == 0, tail
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) >= 29, tail  # every case ran: none skipped
    assert "skipped" not in run.stdout, tail


@pytest.mark.parametrize("layout", [[], ["--channels-last"]])
def test_the_gpu_benchmark_runs_its_steps_on_the_cpu(tmp_path, layout):
    """benchmarks/gpu.py --device cpu: the same steps as on a GPU, on a few images."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(
        [sys.executable, str(TESTS.parent / "benchmarks" / "gpu.py"), "--device", "cpu",
         "--n", "24", "--batch-size", "8", "--workdir", str(tmp_path), *layout],
        capture_output=True, text=True, env=env, cwd=TESTS.parent, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    for step in ("bare forward", "cache (decode + forward + write)",
                 "dissection analysis, run 2 (thresholds + tally on cpu; masks decoded)",
                 "run 3 (thresholds + tally on cpu; masks decoded and stored)",
                 "run 4 (thresholds + tally on cpu; masks read from the store)",
                 "input channels-last" if layout else "input default layout"):
        assert step in out, out[-3000:]
    assert (tmp_path / "gpu_n24.h5").is_file()
