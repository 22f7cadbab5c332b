"""Which implementation a public kernel function runs: Triton or the PyTorch reference.

Rule (DESIGN.md, "Kernels"): Triton where the tensors are on a GPU, or where a caller asks for it
(tests run the kernels in Triton's interpreter on CPU with `backend="triton"` or
CASCADE_KERNELS=triton, and TRITON_INTERPRET=1 set before any kernel is decorated); the reference
elsewhere. `backend` argument > CASCADE_KERNELS environment variable > automatic choice.
"""
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def use_triton(backend: str | None, *tensors: torch.Tensor) -> bool:
    choice = backend or os.environ.get("CASCADE_KERNELS", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"kernel backend '{choice}' is not one of {', '.join(BACKENDS)}")
    if choice == "torch":
        return False
    if choice == "triton":
        on_cpu = any(t is not None and not t.is_cuda for t in tensors)
        if on_cpu and not interpreting():
            raise RuntimeError("Triton kernels on CPU tensors need Triton's interpreter: set "
                               "TRITON_INTERPRET=1 before importing kernels, or use backend='torch'")
        return True
    return all(t.is_cuda for t in tensors if t is not None)


def interpreting() -> bool:
    """True when Triton runs kernels on CPU in its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
