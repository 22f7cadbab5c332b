"""(2+1)D convolution (Imagen Video): spatial kxk per frame, then temporal k. (Reference-only
placeholder; the public signature is the contract.)"""
from kernels.conv3d import conv3d
from kernels.dispatch import use_triton


def conv2plus1d_ref(x, w_spatial, b_spatial, w_temporal, b_temporal, causal=False):
    """x: (B, Cin, T, H, W); w_spatial: (Cmid, Cin, 1, k, k); w_temporal: (Cout, Cmid, kt, 1, 1).
    'same' padding in space and time (causal: past frames only) -> (B, Cout, T, H, W)."""
    k, kt = w_spatial.shape[-1], w_temporal.shape[2]
    h = conv3d(x, w_spatial, b_spatial, padding=(0, k // 2, k // 2), backend="torch")
    return conv3d(h, w_temporal, b_temporal, padding=(kt // 2, 0, 0), causal=causal, backend="torch")


def conv2plus1d(x, w_spatial, b_spatial, w_temporal, b_temporal, causal=False, backend=None):
    if use_triton(backend, x):
        raise NotImplementedError("Triton (2+1)D conv is not written yet")
    return conv2plus1d_ref(x, w_spatial, b_spatial, w_temporal, b_temporal, causal)
