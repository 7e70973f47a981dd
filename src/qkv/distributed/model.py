"""`shard(model, group)`: run a whole model with its sequence sharded across ranks.

Everything per token (embeddings, norms, MLPs, the q/k/v/o projections, the unembedding)
runs on the rank's own tokens; every `MultiHeadAttention` attends over the whole sequence by
`ring_attention`, with RoPE at global positions. Each rank passes its shard of the ids
(`shard_sequence(ids, rank, world, layout, dim=1)`) and gets its shard of the logits.

The swap is a class swap on each attention module (as `torch.nn.utils.parametrize` does):
parameters, state_dict keys and hooks stay where they are; `unshard(model)` restores them.

Letters: b batch, i position (this rank's shard), m model dim, h query head, k kv head,
d head dim.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..nn import LatentAttention, MultiHeadAttention, RotaryEmbedding
from ..nn.capture import record, recorders
from .layout import LAYOUTS, Layout, all_lengths, make_layout
from .ring import ring_attention

_CLASSES: dict[type, type] = {}


class _Sharded:
    """Mixin put in front of a MultiHeadAttention subclass by `shard`."""

    _seq_group: dist.ProcessGroup | None
    _seq_layout: str

    def forward(self, x: Tensor, *, mask=None, cache=None, segments=None) -> Tensor:
        """x (b i m): this rank's tokens → (b i m), attention over every rank's tokens."""
        if mask is not None or cache is not None or segments is not None:
            raise ValueError(
                "a sharded model takes no attention_mask, cache or segments (ring attention "
                "covers one unpadded sequence per batch row); call unshard(model) for those"
            )
        self._check(x, mask, cache)
        B, S, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.d_head
        group = self._seq_group
        lay = _layout(self._seq_layout, S, group, x.device)
        rank = dist.get_rank(group)
        qkv = self._project(x)  # (b i (h+2k) d)
        runs = lay.runs(rank)
        if self.rope is None or len(runs) <= 1:  # one run: RoPE at positions start … start+S−1
            q, k, v = self._rotate(qkv, runs[0][1] if runs else 0)  # (b h i d), (b k i d) ×2
        else:  # zigzag: RoPE at this rank's global positions
            qk, v = qkv.transpose(1, 2).split((H + K, K), dim=1)
            q, k = self.rope(qk, lay.positions(rank, x.device)).split((H, K), dim=1)
        q, k, v = self._normed(q, k, v)  # QK-norm after RoPE, if the module has it (Hunyuan)
        # what the unsharded module passes qkv.attention (score_mod too: ALiBi), but no mask
        kw = {n: a for n, a in self._attn_kwargs(None).items() if n != "mask"}
        z, lse = ring_attention(q, k, v, group=group, layout=lay, **kw, return_lse=True)
        out = self._out(z.transpose(1, 2).reshape(B, S, H * D))  # (b i m)
        if recording := recorders(self):  # this rank's shard; positions in "sequence"
            record(recording, self, q, k, v, z, lse, {**kw, "sequence": (group, lay, rank)})
        return out


def _layout(kind: str, S: int, group, device: torch.device) -> Layout:
    """The layout of this forward: every rank's length (one small all_gather)."""
    return make_layout(kind, all_lengths(S, group, device))


def _sharded_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type("Sharded" + cls.__name__, (_Sharded, cls), {"_unsharded": cls})
    return _CLASSES[cls]


def shard(
    model: nn.Module, group: dist.ProcessGroup | None = None, layout: str = "contiguous"
) -> nn.Module:
    """Make every `MultiHeadAttention` in `model` attend over the sequence sharded across
    `group` (default: the whole world), in `layout` ("contiguous" or "zigzag", as
    `ring_attention`). Returns the model, changed in place; `unshard` undoes it.

    Call the model on this rank's shard of the ids (`shard_sequence(ids, rank, world, layout,
    dim=1)`); it returns this rank's rows of what the unsharded model returns on the whole
    ids, e.g. logits (b i v). Every rank must call it (each attention layer is a collective).
    No attention_mask or KV cache while sharded. Under `qkv.nn.capture` each rank records its
    shard (q, k, v, z, lse of its own positions), with `attn_kwargs["sequence"]` = (group,
    layout, rank) saying which global positions those are (`qkv.lens.distributed` reads them). A model with learned absolute
    position embeddings (an nn.Embedding named like "pos") is refused: it would read local
    positions; RoPE models and position-free ones shard.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding) and "pos" in name.rsplit(".", 1)[-1]:
            raise ValueError(
                f"{name} looks like learned absolute position embeddings, which would read "
                "each rank's local positions; shard supports RoPE and position-free models"
            )
    if not any(isinstance(m, MultiHeadAttention) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} holds no qkv.nn.MultiHeadAttention to shard")
    for name, m in model.named_modules():
        if isinstance(m, LatentAttention):  # its projections are not MultiHeadAttention's
            raise ValueError(
                f"{name} is multi-head latent attention (DeepSeek), which shard does not "
                "support yet; run the model unsharded"
            )
    for name, m in model.named_modules():
        if (
            isinstance(m, RotaryEmbedding)
            and m.scaling is not None
            and m.scaling.rope_type == "longrope"
        ):
            raise ValueError(
                f"{name} uses LongRoPE, whose factors follow the whole sequence's length, which "
                "no rank sees; shard supports the other RoPE scalings (run this model unsharded)"
            )
    if not dist.is_initialized():
        raise RuntimeError(
            "shard needs torch.distributed: call dist.init_process_group (torchrun sets "
            "MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE) before shard(model)"
        )
    for m in model.modules():
        if isinstance(m, MultiHeadAttention):
            if not isinstance(m, _Sharded):
                m.__class__ = _sharded_class(type(m))
            m._seq_group, m._seq_layout = group, layout
    return model


def unshard(model: nn.Module) -> nn.Module:
    """Undo `shard`: every attention module back to its own class. Returns the model."""
    for m in model.modules():
        if isinstance(m, _Sharded):
            m.__class__ = m._unsharded
            del m._seq_group, m._seq_layout
    return model
