"""`accelerate(model)`: swap, once, each module of a model for its float32-CPU-inference twin.

The modules of `qkv.nn` are the formulas in PyTorch ops, on any device and dtype, with
autograd. Their twins here hold the very same parameters (state_dict, `capture`, the lens and
training see no difference) and take faster paths only where those pay, falling back to the
formula for everything else (autograd, GPU, other dtypes):

    MultiHeadAttention → FastMultiHeadAttention  W_Q|W_K|W_V laid out as one matrix (no copy
                         per call), RoPE and the q|k|v split in one pass (`nn.fused.rope_qkv`)
    MLP                → FastMLP                 gate|up laid out as one matrix, one matmul;
                         the activation in place
    RMSNorm            → FastRMSNorm             one pass (`nn.fused.rms_norm`)
    nn.Linear          → FastLinear              large outputs into pre-mapped pages
    Embedding          → FastEmbedding           `attend` (the tied unembedding) likewise

A `SparseMoE` has no twin of its own: its experts are MLPs and its router an nn.Linear, each
swapped as above (the routing itself is unchanged).

With `blocks`, the checkpoint's own quantised blocks (`nn.quant.BlockWeight`) back the matrices
they equal, for the one-token decode step (`nn.quant.linear`); keys are parameter names of
`model.state_dict()` (W_Q, W_K, W_V, W_O included: their blocks are in nn.Linear layout,
W_Q's ((h d), m), W_O's (m, (h d))). The swap is a class swap in place, as `qkv.distributed.shard`
does: module identity, hooks and parameter objects are kept. Apply it before `shard`.

Letters: b batch, i position, m model dim, f MLP hidden dim, h query head, k kv head, d head dim.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fused
from .attention import MultiHeadAttention
from .blocks import ACTIVATIONS, MLP, Embedding, RMSNorm
from .quant import BlockWeight, Mirror, linear

Blocks = Mapping[str, BlockWeight | Callable[[], BlockWeight]]
_Get = Callable[[str], "BlockWeight | Callable[[], BlockWeight] | None"]


def _made(b: BlockWeight | Callable[[], BlockWeight]) -> BlockWeight:
    return b if isinstance(b, BlockWeight) else b()


def _joined(parts: list) -> Callable[[], BlockWeight] | None:
    """Blocks stacking `parts` row-wise, made on first use; None unless every part is given
    and those given as BlockWeight share one kind (parts given as functions must match)."""
    if any(p is None for p in parts):
        return None
    if len({p.kind for p in parts if isinstance(p, BlockWeight)}) > 1:
        return None
    return lambda: BlockWeight.cat([_made(p) for p in parts])


class FastMultiHeadAttention(MultiHeadAttention):
    """MultiHeadAttention for float32 CPU inference; see the module docstring."""

    _packed: tuple | None  # (data_ptrs, w): the packed view, see fused_qkv
    _mirrors: dict[str, Mirror]  # "qkv" (of the fused ((h+2k)·d, m) matrix), "out"

    def _accelerate(self, get: _Get) -> None:
        self._packed, self._mirrors = None, {}
        self.pack_()
        if (qkv := _joined([get("W_Q"), get("W_K"), get("W_V")])) is not None:
            self._mirrors["qkv"] = Mirror(qkv, self.W_Q, self.W_K, self.W_V)
        if (out := get("W_O")) is not None:
            self._mirrors["out"] = Mirror(out, self.W_O)

    @torch.no_grad()
    def pack_(self) -> FastMultiHeadAttention:
        """Lay W_Q, W_K, W_V (and b_Q, b_K, b_V) out in place as per-head views of one fused
        ((h+2k)·d, m) matrix, the nn.Linear layout `_qkv` multiplies by: inference then needs
        no fused copy (half the attention-weight memory). Shapes, values, Parameter objects and
        requires_grad are unchanged; the parameters become non-contiguous views sharing one
        storage (call `.contiguous()` on them before `safetensors.save_file`). Returns self."""
        H, K = self.n_heads, self.n_kv_heads
        w = (
            torch.cat((self.W_Q, self.W_K, self.W_V), 0).transpose(1, 2).contiguous()
        )  # ((h+2k) d m)
        heads = w.transpose(1, 2)  # ((h+2k) m d), a view
        parts = (("W_Q", 0, H), ("W_K", H, H + K), ("W_V", H + K, H + 2 * K))
        for name, lo, hi in parts:
            getattr(self, name).data = heads[lo:hi]
        if self.b_Q is not None:
            b = torch.cat((self.b_Q, self.b_K, self.b_V), 0)  # ((h+2k) d)
            for name, lo, hi in parts:
                getattr(self, "b" + name[1:]).data = b[lo:hi]
        self._fused = self._packed = None
        return self

    def fused_qkv(self) -> tuple[Tensor, Tensor | None]:
        """As MultiHeadAttention's, but a zero-copy view while the weights keep the layout
        `pack_` made (same storage: in-place edits show through the view)."""
        params = (self.W_Q, self.W_K, self.W_V, self.b_Q, self.b_K, self.b_V)
        grad = torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)
        if grad or torch.compiler.is_compiling():  # (the layout check reads storage addresses)
            return super().fused_qkv()
        key = (self.W_Q.data_ptr(), self.W_K.data_ptr(), self.W_V.data_ptr())
        key += (torch.is_inference_mode_enabled(),)
        if self._packed is not None and self._packed[0] != key:
            self._packed = None  # re-laid out (e.g. `.to()`): let the old storage go
        if self._packed is None and (w := self._packed_weight()) is not None:
            self._packed = (key, w)
        if self._packed is None:
            return super().fused_qkv()
        return self._packed[1], self._bias()

    def _packed_weight(self) -> Tensor | None:
        """The ((h+2k)·d, m) matrix W_Q, W_K, W_V are views of, if `pack_` laid them out so."""
        H, K, D, m = self.n_heads, self.n_kv_heads, self.d_head, self.d_model
        q, k, v = self.W_Q, self.W_K, self.W_V
        step = D * m
        if not (q.stride() == k.stride() == v.stride() == (step, 1, m)):
            return None
        ptr = q.untyped_storage().data_ptr()
        if k.untyped_storage().data_ptr() != ptr or v.untyped_storage().data_ptr() != ptr:
            return None
        base = q.storage_offset()
        if k.storage_offset() != base + H * step or v.storage_offset() != base + (H + K) * step:
            return None
        return q.detach().as_strided(((H + 2 * K) * D, m), (m, 1), base)

    def _mirrored(self) -> dict[str, tuple[Mirror, Tensor]]:
        dense = {"qkv": lambda: self.fused_qkv()[0], "out": self.out_weight}
        return {k: (m, dense[k]()) for k, m in self._mirrors.items()}

    def _qkv(self, x: Tensor) -> Tensor:
        return linear(x, *self.fused_qkv(), self._mirrors.get("qkv"))

    def _rotate(self, qkv: Tensor, start: int) -> tuple[Tensor, Tensor, Tensor]:
        rope = self.rope
        if rope is None or rope.rotary_dim != rope.d_head or not fused.eligible(qkv):
            return super()._rotate(qkv, start)
        cos, sin = rope.pair_tables(start + qkv.shape[1])
        return fused.rope_qkv(qkv, cos, sin, start, self.n_heads, self.n_kv_heads, rope.interleaved)

    def _out(self, zf: Tensor) -> Tensor:
        return linear(zf, self.out_weight(), self.b_O, self._mirrors.get("out"))


_INPLACE: dict[str, Callable[[Tensor], Tensor]] = {  # ACTIVATIONS' functions, overwriting x
    "gelu": lambda x: torch.ops.aten.gelu_(x),
    "gelu_tanh": lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
    "silu": lambda x: F.silu(x, inplace=True),
    "relu": lambda x: F.relu(x, inplace=True),
}


class FastMLP(MLP):
    """MLP for inference; see the module docstring. Without autograd: gate and up in one
    (… 2f) matmul when `pack_` laid them out as one matrix, the activation in place."""

    _gate_up: tuple | None  # (layout key, fused_gate_up's answer)
    _mirror: Mirror | None  # of the fused (2f, m) gate|up matrix

    def _accelerate(self, get: _Get) -> None:
        self._gate_up, self._mirror = None, None
        self.pack_()
        if self.fused_gate_up() is not None:
            joined = _joined([get("gate.weight"), get("up.weight")])
            if joined is not None:
                self._mirror = Mirror(joined, self.gate.weight, self.up.weight)

    @torch.no_grad()
    def pack_(self) -> FastMLP:
        """Gated: lay gate and up (weights and biases) out in place as the two halves of one
        (2f, m) matrix (see `fused_gate_up`). Values, Parameter objects and requires_grad are
        unchanged; the weights become views sharing one storage. Plain MLPs are left as they
        are. Returns self."""
        if self.gate is None or self.fused_gate_up() is not None:
            return self  # nothing to fuse, or already one storage (e.g. from the GGUF cache)
        f = self.gate.weight.shape[0]
        w = torch.cat((self.gate.weight, self.up.weight), 0)  # (2f m)
        self.gate.weight.data, self.up.weight.data = w[:f], w[f:]
        if self.gate.bias is not None:
            b = torch.cat((self.gate.bias, self.up.bias), 0)
            self.gate.bias.data, self.up.bias.data = b[:f], b[f:]
        return self

    def fused_gate_up(self) -> tuple[Tensor, Tensor | None] | None:
        """The (2f, m) weight (and (2f,) bias) gate and up are the halves of, if `pack_` laid
        them out so and they still are; else None (also while torch.compile traces: the check
        reads storage addresses)."""
        if self.gate is None or torch.compiler.is_compiling():
            return None
        g, u = self.gate, self.up
        halves = [(g.weight, u.weight)] + ([(g.bias, u.bias)] if g.bias is not None else [])
        # a decode step asks once per layer: reuse the answer while the layout is unchanged
        key = tuple((t.data_ptr(), t.shape, t.stride()) for pair in halves for t in pair)
        key += (torch.is_inference_mode_enabled(),)  # an inference view is no use outside it
        if self._gate_up is not None and self._gate_up[0] == key:
            return self._gate_up[1]
        joined = self._join(halves)
        self._gate_up = (key, joined)
        return joined

    @staticmethod
    def _join(halves: list) -> tuple[Tensor, Tensor | None] | None:
        joined = []
        for a, b in halves:
            if a.shape != b.shape or not (a.is_contiguous() and b.is_contiguous()):
                return None
            if b.data_ptr() != a.data_ptr() + a.numel() * a.element_size():
                return None
            if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
                return None
            joined.append(a.detach().as_strided((2 * a.shape[0], *a.shape[1:]), (*a.stride(),)))
        return joined[0], (joined[1] if len(joined) > 1 else None)

    def _mirrored(self) -> dict[str, tuple[Mirror, Tensor]]:
        fused_w = self.fused_gate_up()
        if self._mirror is None or fused_w is None:
            return {}
        return {"gate_up": (self._mirror, fused_w[0])}

    def forward(self, x: Tensor) -> Tensor:
        params = [x, *self.parameters()]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return super().forward(x)
        if self.gate is None:
            return self.down(self._act_(self.up(x)))
        fused_w = self.fused_gate_up()
        if fused_w is not None:  # one (… 2f) matmul; gate and up are its two halves
            g, u = linear(x, *fused_w, self._mirror).chunk(2, dim=-1)
        else:
            g, u = self.gate(x), self.up(x)
        return self.down(self._act_(g).mul_(u))  # no graph to keep: in place

    def _act_(self, h: Tensor) -> Tensor:
        """act(h), in place for the built-in activations (h is a fresh tensor no graph needs):
        one large allocation fewer per layer, each a round of fresh pages to fault in."""
        inplace = (
            _INPLACE.get(self.act_name) if self.act is ACTIVATIONS.get(self.act_name) else None
        )
        return inplace(h) if inplace is not None else self.act(h)


class FastRMSNorm(RMSNorm):
    """RMSNorm whose float32 CPU inference takes one pass (`nn.fused.rms_norm`, its sum of
    squares in float64)."""

    def _accelerate(self, get: _Get) -> None:
        pass

    def _mirrored(self) -> dict[str, tuple[Mirror, Tensor]]:
        return {}

    def forward(self, x: Tensor) -> Tensor:
        w = self.gain()
        if x.dim() and fused.eligible(x, w):
            return fused.rms_norm(x, w, self.eps)
        return super().forward(x)


class _Mirrored:
    """A twin of a module with one `weight`, backed by that weight's blocks when given."""

    weight: Tensor
    _mirror: Mirror | None

    def _accelerate(self, get: _Get) -> None:
        b = get("weight")
        self._mirror = None if b is None else Mirror(b, self.weight)

    def _mirrored(self) -> dict[str, tuple[Mirror, Tensor]]:
        return {} if self._mirror is None else {"": (self._mirror, self.weight)}


class FastLinear(_Mirrored, nn.Linear):
    """nn.Linear through `nn.quant.linear`: blocks for the decode step when given, large
    float32 outputs into pre-mapped pages."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self._mirror)


class FastEmbedding(_Mirrored, Embedding):
    """Embedding whose `attend` (the tied unembedding) goes through `nn.quant.linear`."""

    def attend(self, h: Tensor) -> Tensor:
        return linear(h, self.weight, None, self._mirror)


# layout first (packing moves W_Q/W_K/W_V and gate/up), then what keys on storage addresses
TWINS: tuple[dict[type, type], ...] = (
    {MultiHeadAttention: FastMultiHeadAttention, MLP: FastMLP, RMSNorm: FastRMSNorm},
    {nn.Linear: FastLinear, Embedding: FastEmbedding},
)


def accelerate(model: nn.Module, blocks: Blocks | None = None) -> nn.Module:
    """Swap every module of `model` that has a twin (see the module docstring) for it, in
    place, and return the model. Exact types only: a subclass of yours is left alone. Calling
    it again re-reads `blocks` (keys: parameter names, values: BlockWeight of that parameter
    in nn.Linear layout, or a function making one on first use).

    ValueError for a key that names no parameter or blocks of the wrong shape."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    blocks = dict(blocks or {})
    params = dict(model.named_parameters(remove_duplicate=False))
    if unknown := sorted(set(blocks) - set(params)):
        raise ValueError(
            f"blocks for {unknown[:5]} name no parameter of {type(model).__name__} "
            f"(keys are its state_dict names, e.g. {next(iter(params), '-')!r})"
        )
    for name, b in blocks.items():
        if isinstance(b, BlockWeight) and b.shape != (want := _linear_shape(name, params[name])):
            raise ValueError(
                f"blocks for {name!r} have shape {b.shape}, but the parameter is {want} in "
                "nn.Linear layout"
            )
    for twins in TWINS:
        for prefix, m in model.named_modules(remove_duplicate=False):
            cls = twins.get(type(m), type(m) if type(m) in twins.values() else None)
            if cls is None:
                continue
            m.__class__ = cls
            m._accelerate(lambda leaf, p=prefix: blocks.get(f"{p}.{leaf}" if p else leaf))
    return model


def mirrors(model: nn.Module) -> dict[str, tuple[Mirror, Tensor]]:
    """Every block-backed matrix of an accelerated model: name → (its Mirror, the dense
    nn.Linear-layout weight the blocks equal). Names are module names, plus ".qkv" (W_Q|W_K|W_V
    fused), ".out" (W_O) and ".gate_up" (gate|up fused) for the matrices twins fuse."""
    out = {}
    for prefix, m in model.named_modules():
        if hasattr(m, "_mirrored"):
            for leaf, item in m._mirrored().items():
                out[".".join(p for p in (prefix, leaf) if p)] = item
    return out


def _linear_shape(name: str, p: Tensor) -> tuple[int, ...]:
    """The (out, in) shape of a parameter used as an nn.Linear weight: W_Q, W_K, W_V (h m d) →
    ((h d), m), W_O (h d m) → (m, (h d)), any other as it is."""
    if p.dim() == 3 and name.rsplit(".", 1)[-1] in ("W_Q", "W_K", "W_V"):
        return (p.shape[0] * p.shape[2], p.shape[1])
    if p.dim() == 3 and name.rsplit(".", 1)[-1] == "W_O":
        return (p.shape[2], p.shape[0] * p.shape[1])
    return tuple(p.shape)
