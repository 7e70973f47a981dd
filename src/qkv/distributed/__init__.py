"""L2 — attention over a sequence sharded across processes, on `torch.distributed`.

    dist.init_process_group("gloo")                       # torchrun sets rank, world, address
    q_r = shard_sequence(q, rank, world, "zigzag")          # this rank's positions
    out_r = ring_attention(q_r, k_r, v_r, causal=True, layout="zigzag")
    shard(model)                                            # a whole model on its shard

Launch and wiring are torchrun's (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE); this package
adds no communication layer of its own: gloo on CPU, NCCL on GPU.
"""

from .layout import LAYOUTS, Layout, gather_sequence, make_layout, shard_sequence
from .model import shard, unshard
from .ring import ring_attention

__all__ = [
    "LAYOUTS",
    "Layout",
    "gather_sequence",
    "make_layout",
    "ring_attention",
    "shard",
    "shard_sequence",
    "unshard",
]
