import os

import torch

# Triton's interpreter must be switched on before any @triton.jit runs (DESIGN.md, "Kernels").
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# OMP_NUM_THREADS when set (the suite passes with 1 and with 2), else up to 2
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes: on the shared 2-core machine a second thread costs more than it gains.
    A module opts in with pytestmark = pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
