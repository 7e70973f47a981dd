"""The numba compile helper now lives below every layer, in `qkv._jit`, so `qkv.attention`'s
fused CPU kernel can use it too; `nn` imports it from there."""

from .._jit import FLAGS, Kernels, wide_vectors_pay

__all__ = ["FLAGS", "Kernels", "wide_vectors_pay"]
