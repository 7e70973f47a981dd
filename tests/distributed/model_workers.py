"""Ranks' side of the sharded-model tests: a whole decoder with its sequence sharded equals the
same model run whole on one process (logits, and parameter gradients summed over ranks)."""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from qkv.distributed import shard, unshard
from qkv.models.decoder import Decoder, DecoderConfig

from .workers import err, mine


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|."""
    return err(a, b) / max(float(b.detach().abs().max()), 1e-30)


POSITIONS = {  # what attention sees of positions, by the decoder's kind of positions
    # RoPE (partial), GQA, QK-norm, a sliding window of 5 on layer 0, an attention softcap
    "rope": {"rope_dim": 6, "qk_norm": True, "windows": (5, None), "attn_softcap": 20.0},
    # ALiBi (BLOOM): a score_mod of the global query and key positions
    "alibi": {"positions": "alibi"},
    # learned attention sinks (gpt-oss), a window on layer 0: folded in after the ring's merge
    "sinks": {"attn_sinks": True, "windows": (5, None)},
}


def tiny_decoder(dtype: torch.dtype, positions: str = "rope") -> Decoder:
    """Two layers, GQA, with `POSITIONS[positions]`."""
    c = DecoderConfig(
        name="tiny", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, d_head=8, d_ff=48,
        vocab_size=50, max_positions=64, **POSITIONS[positions],
    )  # fmt: skip
    torch.manual_seed(0)
    model = Decoder(c)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.to(dtype)


def sharded_decoder(rank: int, world: int) -> dict:
    """Relative errors of logits and parameter gradients, contiguous (uneven: N = 23) and
    zigzag, fp64 and fp32, RoPE, ALiBi (keys "alibi:…") and learned sinks ("sinks:…")."""
    out = {}
    ids = torch.randint(0, 50, (2, 23), generator=torch.Generator().manual_seed(1))
    for positions, dtype in itertools.product(POSITIONS, (torch.float64, torch.float32)):
        pre = "" if positions == "rope" else f"{positions}:"
        model = tiny_decoder(dtype, positions)
        want = model(ids)  # the whole sequence, one process, unsharded
        gen = torch.Generator().manual_seed(2)
        go = torch.randn(want.shape, generator=gen, dtype=torch.float64).to(dtype)
        want.backward(go)
        want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        for layout in ("contiguous", "zigzag"):
            model.zero_grad()
            shard(model, layout=layout)
            got = model(mine(ids, rank, world, layout, dim=1))
            key = f"{pre}{layout}/{str(dtype)[6:]}"
            out[key] = {"logits": rel(got, mine(want, rank, world, layout, dim=1))}
            got.backward(mine(go, rank, world, layout, dim=1))
            g = 0.0
            for n, p in model.named_parameters():
                dist.all_reduce(p.grad)  # each rank holds its tokens' share of the gradient
                g = max(g, rel(p.grad, want_grads[n]))
            out[key]["grads"] = g
            unshard(model)
            out[key]["unsharded"] = rel(model(ids), want)  # unshard restores the model
        # the check can fail: zigzag shards run as if contiguous put RoPE and the causal
        # mask at the wrong positions
        shard(model, layout="contiguous")
        got = model(mine(ids, rank, world, "zigzag", dim=1))
        out[f"{pre}mislabeled/{str(dtype)[6:]}"] = rel(
            got, mine(want, rank, world, "zigzag", dim=1)
        )
        unshard(model)
    return out


def smollm2_sharded(rank: int, world: int) -> dict:
    """smollm2, 2 ranks: the sharded forward's logits vs the same model whole."""
    import qkv

    torch.manual_seed(0)
    model = qkv.load("smollm2")
    text = "The dog chased the ball because it was excited. " * 6
    ids = torch.tensor([model.tokenizer.encode(text).ids])
    with torch.no_grad():
        want = model(ids)
        shard(model, layout="zigzag")
        got = model(mine(ids, rank, world, "zigzag", dim=1))
    return {"logits": err(got, mine(want, rank, world, "zigzag", dim=1)), "n": ids.shape[1],
            "scale": float(want.abs().max())}  # fmt: skip
