"""Which implementation a public kernel function runs: Triton or the PyTorch reference; how the
launchers launch (and, for the sm_90 compile test, record) their kernels.

Rule (DESIGN.md, "Kernels"): Triton where the tensors are on a GPU, or where a caller asks for it
(tests run the kernels in Triton's interpreter on CPU with `backend="triton"` or
CASCADE_KERNELS=triton, and TRITON_INTERPRET=1 set before any kernel is decorated); the reference
elsewhere. `backend` argument > CASCADE_KERNELS environment variable > automatic choice.

Recording (tests/kernels/test_gpu_compile.py): inside `with recording() as launches:` every
launcher call `launch(kernel, grid)(*args, **kwargs)` appends a Launch to `launches` instead of
running the kernel, `interpreting()` is False (the launchers pick the tiles they would pick on a
GPU), `sm_count()` answers an H100's 132 SMs, and `backend="triton"` works on CPU tensors without
the interpreter. The public functions can then run on CPU tensors (outputs stay uninitialised) and
each recorded launch be compiled for sm_90 with the arguments a GPU run would pass.
"""
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "triton", "torch")

H100_SMS = 132


@dataclass
class Launch:
    """One recorded kernel launch: kernel[grid](*args, **kwargs)."""
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder(list):
    def __init__(self, sms):
        super().__init__()
        self.sms = sms


_recorder: _Recorder | None = None


@contextmanager
def recording(sms: int = H100_SMS):
    """Record launches instead of running them (see the module docstring) -> the list of Launch."""
    global _recorder
    outer, _recorder = _recorder, _Recorder(sms)
    try:
        yield _recorder
    finally:
        _recorder = outer


def launch(kernel, grid):
    """kernel[grid], or, while recording, a callable that records the launch."""
    if _recorder is None:
        return kernel[grid]
    rec = _recorder

    def record(*args, **kwargs):
        rec.append(Launch(kernel, tuple(grid), args, kwargs))
    return record


def sm_count(device) -> int:
    """Streaming multiprocessors of `device` (the launchers size their grids by it)."""
    if _recorder is not None:
        return _recorder.sms
    return torch.cuda.get_device_properties(device).multi_processor_count


def use_triton(backend: str | None, *tensors: torch.Tensor) -> bool:
    choice = backend or os.environ.get("CASCADE_KERNELS", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"kernel backend '{choice}' is not one of {', '.join(BACKENDS)}")
    if choice == "torch":
        return False
    if choice == "triton":
        on_cpu = any(t is not None and not t.is_cuda for t in tensors)
        if on_cpu and not interpreting() and _recorder is None:
            raise RuntimeError("Triton kernels on CPU tensors need Triton's interpreter: set "
                               "TRITON_INTERPRET=1 before importing kernels, or use backend='torch'")
        return True
    return all(t.is_cuda for t in tensors if t is not None)


def interpreting() -> bool:
    """True when Triton runs kernels on CPU in its interpreter (TRITON_INTERPRET=1); False while
    recording (the launchers then choose what they would choose on a GPU)."""
    return _recorder is None and os.environ.get("TRITON_INTERPRET", "0") == "1"
