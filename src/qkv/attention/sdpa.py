"""The `sdpa` backend: PyTorch's fused `scaled_dot_product_attention`, used only where the
request maps onto it exactly (no softcap or score_mod; dropout only from the global RNG).
Masks it cannot express natively (window, mask_mod, causal with Sq ≠ Sk) are materialised
into one boolean/float mask first, which costs O(Sq·Sk) memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import scoring
from .reference import graph_grads, refuse_twice_through_dropout
from .spec import Spec


def unsupported(spec: Spec) -> str | None:
    """Why this request does not map onto SDPA exactly, or None if it does."""
    if spec.softcap is not None:
        return "softcap"
    if spec.score_mod is not None:
        return "score_mod"
    if spec.sinks is not None:
        return "sinks (SDPA has no sink term)"
    if spec.dropout_p > 0 and spec.generator is not None:
        return "dropout with a generator (SDPA draws from the global RNG)"
    return None


def dense_mask(spec: Spec, device) -> Tensor | None:
    """Every mask of the request as one SDPA attn_mask (bool keep, or float bias with −inf)."""
    blk = scoring.block(spec, slice(0, spec.Sq), 0, spec.Sk, device)
    keep = scoring.keep(spec, blk, device)
    bias = spec.bias
    if bias is None:
        return keep
    return bias if keep is None else bias.masked_fill(~keep, float("-inf"))


def sdpa(q: Tensor, k: Tensor, v: Tensor, spec: Spec) -> Tensor:
    why = unsupported(spec)
    if why is not None:
        raise ValueError(
            f"backend='sdpa' cannot compute {why} exactly; use backend='tiled' or 'auto'"
        )
    only_causal = (
        spec.left is None and spec.right == 0 and spec.mask is None and spec.mask_mod is None
    )
    is_causal = only_causal and spec.Sq == spec.Sk
    mask = None if is_causal or not spec.masked else dense_mask(spec, q.device)
    if mask is not None and mask.is_floating_point():
        mask = mask.to(q.dtype)

    def call(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=spec.dropout_p,
            is_causal=is_causal,
            scale=spec.scale,
            enable_gqa=spec.G > 1,
        )

    inputs = (q, k, v) if mask is None or not mask.is_floating_point() else (q, k, v, mask)
    if (
        scoring.needs_grad(*inputs)
        and not torch.compiler.is_compiling()
        and not scoring.transforms_active()  # torch.func differentiates SDPA
    ):
        return _Twice.apply(call, spec.dropout_p, mask, *inputs[:3], *inputs[3:])
    return call(q, k, v, mask)


class _Twice(torch.autograd.Function):
    """SDPA differentiable twice. PyTorch's fused kernels (CPU flash, CUDA flash/efficient)
    have no double backward, so `create_graph=True` through them fails. This runs the fused
    kernel and keeps its graph for plain backwards; a backward that must itself be
    differentiable (gradient penalties, Hessian-vector products) recomputes the forward on
    SDPA's math backend, which is composite and differentiates any number of times, the mask
    included. Not with dropout: its mask cannot be redrawn."""

    @staticmethod
    def forward(ctx, call, dropout_p, mask, q, k, v, *float_mask):
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v, *float_mask)]
        with torch.enable_grad():
            out = call(*leaves[:3], leaves[3] if float_mask else mask)
        ctx.call, ctx.dropout_p, ctx.mask = call, dropout_p, mask
        ctx.n = 3 + len(float_mask)
        # the inner graph lives through the saved `out`: freed with this node's saved tensors
        # after a backward (kept by retain_graph=True), never held until the graph is dropped
        ctx.save_for_backward(q, k, v, *float_mask, out, *leaves)
        return out.detach()

    @staticmethod
    def backward(ctx, dout):
        saved = ctx.saved_tensors
        inputs, out, leaves = saved[: ctx.n], saved[ctx.n], saved[ctx.n + 1 :]
        if not torch.is_grad_enabled():  # a plain backward: the fused kernel's own
            wrt = [t for t in leaves if t.requires_grad]
            # retained within this backward's saved tensors: a second backward of the same
            # graph (retain_graph=True, gradcheck) needs it again
            got = iter(torch.autograd.grad(out, wrt, dout, retain_graph=True) if wrt else ())
            return None, None, None, *(next(got) if t.requires_grad else None for t in leaves)
        refuse_twice_through_dropout(ctx.dropout_p, "sdpa")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            again = ctx.call(*inputs[:3], inputs[3] if len(inputs) > 3 else ctx.mask)
        return None, None, None, *graph_grads([again], [dout], inputs, ctx.needs_input_grad[3:])


def lse_supported(q: Tensor, k: Tensor, v: Tensor, spec: Spec) -> bool:
    """Whether one of PyTorch's fused kernels can return (out, lse) for this request exactly.

    They compute plain or causal (Sq == Sk) attention without masks, mods or dropout: on CPU the
    flash kernel (any float dtype, D == Dv); on CUDA the flash kernel (fp16/bf16) or the memory-efficient
    one (fp32), for head dims D == Dv, a multiple of 8, ≤ 256. Their LSE has no gradient path,
    so they serve only calls that need no gradient (the lens' capture).
    """
    needs_grad = scoring.needs_grad(q, k, v)
    causal_only = spec.left is None and spec.right in (None, 0)
    exact = (
        not needs_grad
        and causal_only
        and (spec.right is None or spec.Sq == spec.Sk)
        and spec.mask is None
        and spec.mask_mod is None
        and unsupported(spec) is None
        and spec.dropout_p == 0
        and spec.Sq > 0
        and spec.Sk > 0
    )
    if not exact:
        return False
    if q.device.type == "cpu":  # its flash kernel: "Q/K/V should have the same head size"
        return spec.D == spec.Dv and hasattr(
            torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"
        )
    return (
        q.device.type == "cuda"
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and spec.D == spec.Dv
        and spec.D % 8 == 0
        and spec.D <= 256
    )


def _lse_refusal(q: Tensor, k: Tensor, v: Tensor, spec: Spec) -> str:
    """What in this request keeps SDPA's LSE kernels from it, in the caller's terms (a window's
    keys may have been cut before the backend ran, so Sk is named only where it is the
    caller's)."""
    if scoring.needs_grad(q, k, v):
        return "a gradient to take"
    if spec.left is not None or spec.right not in (None, 0):
        return f"a window {(spec.left, spec.right)}"
    if spec.mask is not None or spec.mask_mod is not None:
        return "a mask"
    if spec.right == 0 and spec.Sq != spec.Sk:
        return f"causal with Sq={spec.Sq} ≠ Sk={spec.Sk}"
    if unsupported(spec) is not None or spec.dropout_p > 0:
        return unsupported(spec) or f"dropout_p={spec.dropout_p}"
    if spec.Sq == 0 or spec.Sk == 0:
        return f"Sq={spec.Sq}, Sk={spec.Sk}"
    return f"D={spec.D}, Dv={spec.Dv} on {q.device.type} in {q.dtype}"


def sdpa_lse(q: Tensor, k: Tensor, v: Tensor, spec: Spec) -> tuple[Tensor, Tensor]:
    """(out, lse (B, Hq, Sq) fp32) from a fused kernel; K/V are expanded to Hq heads for GQA
    (O(N) memory), as the kernels that return the LSE take equal head counts."""
    if not lse_supported(q, k, v, spec):
        raise ValueError(
            "backend='sdpa' returns the LSE only without gradients, for plain or causal (Sq == Sk) "
            "attention with Sq, Sk > 0, on CPU (D == Dv) or on CUDA (D == Dv, a multiple of 8, "
            f"≤ 256); this request has {_lse_refusal(q, k, v, spec)}; use backend='tiled' or 'auto'"
        )
    if spec.G > 1:
        k, v = k.repeat_interleave(spec.G, dim=1), v.repeat_interleave(spec.G, dim=1)
    causal = spec.right == 0
    if q.device.type == "cpu":
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out, lse = op(q, k, v, 0.0, causal, scale=spec.scale)
        return out, lse
    if q.dtype == torch.float32:  # the memory-efficient kernel; its LSE may be padded past Sq
        got = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, causal, scale=spec.scale
        )
        return got[0], got[1][..., : spec.Sq]
    got = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, scale=spec.scale)
    return got[0], got[1]
