"""MXFP4 checkpoint tensors (gpt-oss's experts) → the dense tensors transformers' model holds.

A gpt-oss checkpoint stores each expert matrix X as two uint8 tensors:

    X_blocks (e r g 16)   row r of expert e as g groups of 32 FP4 codes, two per byte, the
                          low nibble first: code[2j] = byte[j] & 15, code[2j+1] = byte[j] >> 4
    X_scales (e r g)      each group's E8M0 exponent s: the group's values times 2^(s − 127)

An FP4 code is E2M1: bit 3 the sign, bits 2-1 the exponent, bit 0 the mantissa, so codes 0-7
are 0, 0.5, 1, 1.5, 2, 3, 4, 6 (exponent 0: the subnormals 0 and 0.5) and codes 8-15 their
negatives. Dequantised, the rows become columns: X (e, g·32, r), so that the model computes
x @ X[e]. For gpt-oss, gate_up_proj_blocks (e, 2f, m/32, 16) → gate_up_proj (e, m, 2f) and
down_proj_blocks (e, m, f/32, 16) → down_proj (e, f, m).

    packed = packed_params(checkpoint)       # {"…experts.gate_up_proj": Packed(...), ...}
    w = dequantize(checkpoint[p.blocks], checkpoint[p.scales], torch.float32)
    view = Dequantized(checkpoint)           # the checkpoint with every pair replaced, lazily

Letters: e experts, r rows (output features), g groups of 32 along a row, k = g·32 inputs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

BLOCKS, SCALES = "_blocks", "_scales"
GROUP = 32  # FP4 values per scale: 16 bytes
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # codes 0-7; code | 8 is the negative
_CHUNK = 1 << 24  # elements decoded per step


def _check(blocks: Tensor, scales: Tensor, bname: str = "blocks", sname: str = "scales") -> None:
    """ValueError naming the tensor, its shape or dtype, and what an MXFP4 pair needs."""
    for name, t, what in ((bname, blocks, "two FP4 codes per byte"),
                          (sname, scales, "one E8M0 exponent per byte")):  # fmt: skip
        if not isinstance(t, Tensor):
            raise TypeError(f"{name!r} must be a tensor, got {type(t).__name__}")
        if t.dtype != torch.uint8:
            raise ValueError(f"{name!r} is {t.dtype}, expected torch.uint8 ({what})")
    if blocks.dim() != 4 or blocks.shape[-1] != GROUP // 2:
        raise ValueError(
            f"{bname!r} has shape {tuple(blocks.shape)}, expected (experts, rows, groups, 16): "
            "32 FP4 codes per group in 16 bytes"
        )
    if scales.shape != blocks.shape[:-1]:
        raise ValueError(
            f"{sname!r} has shape {tuple(scales.shape)}, expected {tuple(blocks.shape[:-1])} "
            f"(one exponent per 32-value group of {bname!r})"
        )
    if scales.device != blocks.device:
        raise ValueError(
            f"{sname!r} is on {scales.device} but {bname!r} on {blocks.device}; put both on one"
        )


def dequantize(
    blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.bfloat16, *, chunk: int = _CHUNK
) -> Tensor:
    """MXFP4 blocks (e r g 16) uint8 and scales (e r g) uint8 → (e, g·32, r) in `dtype`, on
    blocks' device: exactly the tensor transformers' gpt-oss holds for that parameter
    (`convert_moe_packed_tensors`), rows turned into columns. Equivalent code:

        codes = torch.stack([blocks & 15, blocks >> 4], -1).reshape(e, r, g, 32)
        values = FP4[codes] * 2.0 ** (scales.double() - 127)[..., None]  # FP4: see module doc
        return values.reshape(e, r, g * 32).transpose(1, 2).to(dtype).contiguous()

    Each value is the exact v · 2^(s − 127), rounded once to `dtype`, bit for bit as
    transformers': values beyond the dtype's range become ±inf (6 · 2^126, s = 253, in
    bfloat16 and float32; 6 · 2^14, s = 141, in float16), tiny ones subnormal or ±0
    (float16: 0.5 · 2^-24, s = 103, rounds to 0), −0 stays −0. Scale byte 255, NaN in the
    OCP MX spec, is read as 2^128, as transformers reads it (real checkpoints do not use it).
    Decoded `chunk` values at a time (at least one row of k): besides the result, no tensor
    holds more than chunk float32 values (float64 for float64), whatever e is.
    """
    _check(blocks, scales)
    if not isinstance(dtype, torch.dtype) or dtype not in (
        torch.bfloat16, torch.float16, torch.float32, torch.float64,
    ):  # fmt: skip
        raise ValueError(
            f"dtype must be torch.bfloat16, float16, float32 or float64, got {dtype!r}"
        )
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int ≥ 1 (values per step), got {chunk!r}")
    E, R, G, _ = blocks.shape
    K = G * GROUP
    # v·4 (0 … 24) and 2^(s−129): both exact in float32 (2^-129 a subnormal), and so is every
    # finite product v·2^(s−127) (≥ 2^-128); only 6·2^128 and its like overflow, to ±inf
    # as they must. float64 results are decoded in float64.
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    fp4 = [*_E2M1, *(-v for v in _E2M1)]
    pairs = torch.tensor(
        [[4 * fp4[b & 15], 4 * fp4[b >> 4]] for b in range(256)], dtype=wide, device=blocks.device
    )  # (256 2): a byte's two values, low nibble first, ×4
    scale = torch.tensor([2.0 ** (s - 129) for s in range(256)], dtype=wide, device=blocks.device)
    out = torch.empty(E, K, R, dtype=dtype, device=blocks.device)  # (e k r)
    rows = max(1, chunk // max(K, 1))  # rows of one expert per step
    n_e, n_r = (max(1, rows // R), R) if rows >= R else (1, rows)
    for e0 in range(0, E, n_e):
        for r0 in range(0, R, n_r):
            b = blocks[e0 : e0 + n_e, r0 : r0 + n_r]  # (e' r' g 16)
            v = pairs[b.int()].view(*b.shape[:3], GROUP)  # (e' r' g 32)
            v.mul_(scale[scales[e0 : e0 + n_e, r0 : r0 + n_r].int()].unsqueeze(-1))
            out[e0 : e0 + n_e, :, r0 : r0 + n_r] = v.view(*b.shape[:2], K).transpose(1, 2)
    return out


@dataclass(frozen=True)
class Packed:
    """One MXFP4 parameter of a checkpoint: its name, its two tensors' names, and the shape
    `dequantize` gives it, (e, g·32, r)."""

    param: str
    blocks: str
    scales: str
    shape: tuple[int, int, int]


def packed_params(checkpoint: Mapping[str, Tensor]) -> dict[str, Packed]:
    """Every `X_blocks` / `X_scales` pair of `checkpoint` → {X: Packed(X, X_blocks, X_scales,
    shape of X)}, in the checkpoint's order. ValueError (nothing half-read) for a `_blocks`
    without its `_scales` or the reverse, a dense X beside its pair, a dtype other than
    uint8, blocks not (e, r, g, 16) or scales not (e, r, g), naming the tensor, the expected
    and the actual values."""
    keys = set(checkpoint.keys())
    found: dict[str, Packed] = {}
    for key in checkpoint.keys():
        if key.endswith(SCALES) and key.removesuffix(SCALES) + BLOCKS not in keys:
            raise ValueError(
                f"{key!r} has no {key.removesuffix(SCALES) + BLOCKS!r} beside it; an MXFP4 "
                "parameter needs both"
            )
        if not key.endswith(BLOCKS):
            continue
        param = key.removesuffix(BLOCKS)
        sname = param + SCALES
        if sname not in keys:
            raise ValueError(f"{key!r} has no {sname!r} beside it; an MXFP4 parameter needs both")
        if param in keys:
            raise ValueError(
                f"{param!r} is in the checkpoint both dense and as {key!r} / {sname!r}; "
                "expected one of the two"
            )
        b, s = checkpoint[key], checkpoint[sname]
        _check(b, s, key, sname)
        E, R, G, _ = b.shape
        found[param] = Packed(param, key, sname, (E, G * GROUP, R))
    return found


class Dequantized(Mapping[str, Tensor]):
    """`checkpoint` with each MXFP4 pair X_blocks / X_scales replaced by X, dequantized to
    `dtype` when read (`dequantize`); the last one read is kept, so per-expert slices of one
    parameter read in a row decode it once. Other tensors pass through as they are. The
    pairs are checked on construction (`packed_params`)."""

    def __init__(
        self,
        checkpoint: Mapping[str, Tensor],
        dtype: torch.dtype = torch.bfloat16,
        *,
        chunk: int = _CHUNK,
    ) -> None:
        self.checkpoint, self.dtype, self.chunk = checkpoint, dtype, chunk
        self.packed = packed_params(checkpoint)
        hidden = {n for p in self.packed.values() for n in (p.blocks, p.scales)}
        self._keys = [k for k in checkpoint.keys() if k not in hidden] + list(self.packed)
        self._plain = set(self._keys) - set(self.packed)
        self._last: tuple[str, Tensor] | None = None

    def __getitem__(self, key: str) -> Tensor:
        p = self.packed.get(key)
        if p is None:
            if key not in self._plain:
                raise KeyError(key)
            return self.checkpoint[key]
        if self._last is None or self._last[0] != key:
            self._last = None  # free the previous one first
            c = self.checkpoint
            self._last = (key, dequantize(c[p.blocks], c[p.scales], self.dtype, chunk=self.chunk))
        return self._last[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self.packed or key in self._plain
