"""KV cache for incremental decoding: each attention layer keeps the keys and values of every
token seen so far, so a new token's query only needs its own k/v computed.

Letters: b batch, h kv head, j cached position, d head dim, e value dim.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LayerCache:
    """Keys (b h j d) and values (b h j e) of one attention layer, in a buffer that grows by
    doubling (amortised O(1) append; `reserve` preallocates). Returned tensors are views of the
    first `length` positions; later appends never change them."""

    def __init__(self) -> None:
        self._k: Tensor | None = None
        self._v: Tensor | None = None
        self.length = 0

    def __repr__(self) -> str:
        shape = None if self._k is None else (*self._k.shape[:2], self.length, self._k.shape[3])
        return f"LayerCache(length={self.length}, k={shape})"

    @property
    def k(self) -> Tensor | None:
        """Cached keys (b h j d), or None before the first append."""
        return None if self._k is None else self._k[:, :, : self.length]

    @property
    def v(self) -> Tensor | None:
        """Cached values (b h j e), or None before the first append."""
        return None if self._v is None else self._v[:, :, : self.length]

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` positions in total (no-op before the first append)."""
        if self._k is None or self._k.shape[2] >= capacity:
            return
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:2], capacity, old.shape[3]))
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k (b h s d), v (b h s e); return all keys and values so far, (b h j d), (b h j e)."""
        if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
            raise ValueError(
                f"k and v must be (B, H, S, D) with equal B, H, S; got k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        if self._k is None:
            cap = max(16, k.shape[2])
            self._k = k.new_empty((*k.shape[:2], cap, k.shape[3]))
            self._v = v.new_empty((*v.shape[:2], cap, v.shape[3]))
        else:
            want = (self._k.shape[0], self._k.shape[1], self._k.shape[3], self._v.shape[3])
            got = (k.shape[0], k.shape[1], k.shape[3], v.shape[3])
            if got != want:
                raise ValueError(
                    f"cache holds (B, H, D, Dv) = {want} but the new k/v have {got}; "
                    "use a fresh KVCache for a different batch or model"
                )
            if k.dtype != self._k.dtype or k.device != self._k.device:
                raise ValueError(
                    f"cache holds {self._k.dtype} on {self._k.device}, new k is {k.dtype} on {k.device}"
                )
        end = self.length + k.shape[2]
        if end > self._k.shape[2]:
            self.reserve(max(end, 2 * self._k.shape[2]))
        with torch.no_grad():
            self._k[:, :, self.length : end] = k
            self._v[:, :, self.length : end] = v
        self.length = end
        return self._k[:, :, :end], self._v[:, :, :end]


class KVCache:
    """One `LayerCache` per attention layer: `cache[i]` is layer i's.

    `cache.length` is the number of tokens every layer has cached (the position the next token
    takes). Pass the same cache to successive calls of a model to decode incrementally; the
    outputs equal one uncached call on the concatenated input. Cached tensors are detached
    (the cache is for inference).
    """

    def __init__(self, n_layers: int) -> None:
        if not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers <= 0:
            raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
        self.layers = [LayerCache() for _ in range(n_layers)]

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return f"KVCache(n_layers={len(self.layers)}, length={self.length})"

    @property
    def length(self) -> int:
        return min(layer.length for layer in self.layers)

    def reserve(self, capacity: int) -> None:
        """Preallocate room for `capacity` tokens in every layer that has started."""
        for layer in self.layers:
            layer.reserve(capacity)
