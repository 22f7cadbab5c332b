"""benchmarks/gpu_check.sh on a machine without a GPU: one line saying so, exit 0, nothing written;
an unknown part is refused."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_check_without_gpu_prints_one_notice(tmp_path):
    for parts in ([], ["kernels"]):
        proc = subprocess.run(["bash", str(SCRIPT), *parts], capture_output=True, text=True,
                              timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                                                "GPU_CHECK_OUT": str(tmp_path / "gpu")})
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.strip().splitlines()
        assert len(lines) == 1 and "no CUDA GPU" in lines[0], proc.stdout
        assert not (tmp_path / "gpu").exists()


def test_gpu_check_refuses_an_unknown_part():
    proc = subprocess.run(["bash", str(SCRIPT), "everything"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "unknown part 'everything'" in proc.stderr
