"""L2 — modules that own W_Q, W_K, W_V, W_O and call `qkv.attention`."""
