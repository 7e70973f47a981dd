"""`qkv.nn.LatentAttention` (DeepSeek's multi-head latent attention) against transformers'
DeepseekV3Attention in float64: with and without q_lora_rank, RoPE on interleaved pairs and on
halves, attention biases, a right-padded batch, the KV cache fed in uneven chunks; the recorded
q, k and LSE give transformers' own attention probabilities; then each MLA detail switched
off breaks parity, and bad settings are named.

Awkward sizes: d_model 44, 5 heads, q latent 19, kv latent 13, nope 7 + rope 6 (q/k head dim
13, odd), values 11 wide, 23 tokens. The oracle's RoPE angles are computed here in float64
(transformers' own are float32), and so are its latents' RMSNorms and its softmax.
"""

import math

import pytest
import torch

from qkv.attention import attention_weights
from qkv.nn import KVCache, LatentAttention, MLAConfig, RotaryEmbedding, capture

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (  # noqa: E402
    DeepseekV3Attention,
)

M, H, CQ, CKV, NOPE, ROPE, EV, S = 44, 5, 19, 13, 7, 6, 11, 23
BASE = 500.0
TOL = 1e-10  # float64, relative to the largest output


def _ref(q_lora: int | None, interleave: bool, bias: bool = True, eps: float = 1e-5):
    cfg = transformers.DeepseekV3Config(
        hidden_size=M, num_attention_heads=H, num_key_value_heads=H, q_lora_rank=q_lora,
        kv_lora_rank=CKV, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=EV,
        attention_bias=bias, rope_interleave=interleave, rms_norm_eps=eps,
        rope_parameters={"rope_type": "default", "rope_theta": BASE},
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    ref = DeepseekV3Attention(cfg, layer_idx=0).double().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
            if "layernorm" in name:
                p.add_(1.0)
    for mod in (ref.q_a_layernorm, ref.kv_a_layernorm):  # float32 inside: float64 here
        if mod is not None:
            mod.forward = lambda h, m=mod: (
                m.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + m.variance_epsilon))
            )
    return ref


@pytest.fixture(autouse=True)
def float64_softmax(monkeypatch):
    """transformers' eager attention takes its softmax in float32: float64 here."""
    softmax = torch.nn.functional.softmax

    def softmax64(x, dim=None, _stacklevel=3, dtype=None):
        return softmax(x, dim=dim, dtype=x.dtype if x.dtype == torch.float64 else dtype)

    monkeypatch.setattr(torch.nn.functional, "softmax", softmax64)


def _ours(ref, interleave: bool) -> LatentAttention:
    """A LatentAttention holding ref's weights, converted here by hand: (out, in) nn.Linear
    weights to per-head (h in out), kv_b_proj's rows per head [k_nope | v]."""
    c = ref.config
    mla = MLAConfig(c.q_lora_rank, CKV, NOPE, ROPE, EV)
    rope = RotaryEmbedding(ROPE, base=BASE, interleaved=interleave)
    bias = c.attention_bias
    ours = LatentAttention(M, H, mla, rope=rope, bias=bias, dtype=torch.float64)
    D = NOPE + ROPE
    with torch.no_grad():
        q = ref.q_proj if c.q_lora_rank is None else ref.q_b_proj
        ours.W_Q.copy_(q.weight.view(H, D, -1).transpose(1, 2))
        if c.q_lora_rank is not None:
            ours.q_down.weight.copy_(ref.q_a_proj.weight)
            ours.q_latent_norm.weight.copy_(ref.q_a_layernorm.weight)
            if bias:
                ours.q_down.bias.copy_(ref.q_a_proj.bias)
        ours.kv_down.weight.copy_(ref.kv_a_proj_with_mqa.weight)
        ours.kv_latent_norm.weight.copy_(ref.kv_a_layernorm.weight)
        kv = ref.kv_b_proj.weight.view(H, NOPE + EV, CKV)
        ours.W_UK.copy_(kv[:, :NOPE].transpose(1, 2))
        ours.W_UV.copy_(kv[:, NOPE:].transpose(1, 2))
        ours.W_O.copy_(ref.o_proj.weight.t().reshape(H, EV, M))
        if bias:
            ours.kv_down.bias.copy_(ref.kv_a_proj_with_mqa.bias)
            ours.b_O.copy_(ref.o_proj.bias)
    return ours


def _cos_sin(n: int):
    """transformers' (cos, sin) layout, cat(angles, angles), in float64."""
    inv = 1.0 / BASE ** (torch.arange(0, ROPE, 2, dtype=torch.float64) / ROPE)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv
    emb = torch.cat((ang, ang), -1)[None]  # (1 i r)
    return emb.cos(), emb.sin()


def _run_ref(ref, x, keep=None):
    """ref's output and attention probabilities with a causal (and key padding) mask."""
    n = x.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None, None]  # (1 1 i j)
    if keep is not None:
        allowed = allowed & keep[:, None, None, :]
    bias = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, -torch.inf)
    with torch.no_grad():
        return ref(x, position_embeddings=_cos_sin(n), attention_mask=bias)


def _x(b: int = 2, n: int = S, seed: int = 1):
    return torch.randn(b, n, M, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rel(got, want) -> float:
    return float((got - want).abs().max() / want.abs().max())


CASES = [(CQ, True), (None, True), (CQ, False), (None, False)]


@pytest.mark.parametrize(("q_lora", "interleave"), CASES)
def test_matches_transformers_in_float64(q_lora, interleave):
    ref = _ref(q_lora, interleave)
    ours = _ours(ref, interleave)
    x = _x()
    want, _ = _run_ref(ref, x)
    with torch.no_grad():
        assert rel(ours(x), want) <= TOL


@pytest.mark.parametrize(("q_lora", "interleave"), CASES[:2])
def test_padded_batch_matches(q_lora, interleave):
    ref = _ref(q_lora, interleave)
    ours = _ours(ref, interleave)
    x = _x()
    keep = torch.ones(2, S, dtype=torch.bool)
    keep[1, 15:] = False
    want, _ = _run_ref(ref, x, keep)
    with torch.no_grad():
        got = ours(x, mask=keep[:, None, None, :])
        packed = ours(torch.cat((x[0], x[1, :15]))[None], segments=[S, 15])[0]
    assert rel(got[keep], want[keep]) <= TOL
    assert rel(packed, want[keep]) <= TOL


@pytest.mark.parametrize(("q_lora", "interleave"), CASES[:2])
def test_the_cache_fed_in_chunks_matches(q_lora, interleave):
    ref = _ref(q_lora, interleave)
    ours = _ours(ref, interleave)
    x = _x()
    want, _ = _run_ref(ref, x)
    cache = KVCache(1)
    outs = []
    with torch.no_grad():
        for a, b in ((0, 9), (9, 10), (10, 17), (17, S)):
            outs.append(ours(x[:, a:b], cache=cache[0]))
    assert cache.length == S
    assert cache[0].k.shape == (2, H, S, NOPE + ROPE) and cache[0].v.shape == (2, H, S, EV)
    assert rel(torch.cat(outs, 1), want) <= TOL


def test_the_capture_gives_transformers_attention_probabilities():
    ref = _ref(CQ, True)
    ours = _ours(ref, True)
    x = _x()
    _, probs = _run_ref(ref, x)  # (b h i j)
    with torch.no_grad(), capture(ours) as cap:
        out = ours(x)
    rec = cap.layers[0]
    assert rec.q.shape == (2, H, S, NOPE + ROPE) and rec.v.shape == (2, H, S, EV)
    assert rec.W_O.shape == (H, EV, M) and rec.attn_kwargs["scale"] == 1 / math.sqrt(NOPE + ROPE)
    w = attention_weights(rec.q, rec.k, rec.lse, **rec.attn_kwargs)
    assert float((w - probs).abs().max()) <= 1e-12
    heads = torch.einsum("bhie,hem->bim", rec.z, rec.W_O) + rec.b_O
    assert rel(heads, out) <= TOL


# --------------------------------------------------------------------------------------------
# each detail matters (the checks can fail)


def _broken_error(edit, q_lora=CQ, interleave=True) -> float:
    ref = _ref(q_lora, interleave)
    ours = _ours(ref, interleave)
    edit(ours)
    x = _x()
    want, _ = _run_ref(ref, x)
    with torch.no_grad():
        return rel(ours(x), want)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda a: setattr(a.rope, "interleaved", False), id="halves-not-pairs"),
        pytest.param(lambda a: setattr(a, "rope", None), id="no-rope"),
        pytest.param(lambda a: setattr(a, "q_latent_norm", torch.nn.Identity()), id="no-q-norm"),
        pytest.param(lambda a: setattr(a, "kv_latent_norm", torch.nn.Identity()), id="no-kv-norm"),
        pytest.param(lambda a: setattr(a, "scale", a.scale * 1.1), id="scale"),
        pytest.param(lambda a: torch.nn.init.zeros_(a.kv_down.bias), id="no-kv-bias"),
        pytest.param(lambda a: setattr(a, "causal", False), id="not-causal"),
    ],
)
def test_each_detail_breaks_parity(edit):
    assert _broken_error(edit) > 1e3 * TOL


def test_a_rope_key_per_head_would_differ():
    """k_pe is one vector for all heads: rotating the q heads' own rope features as keys
    (a per-head k_pe) is not the same model."""

    def per_head(a):
        positioned = a._positioned

        def fake(parts, start):
            q_nope, q_pe, k_nope, _, v = parts
            return positioned((q_nope, q_pe, k_nope, q_pe, v), start)

        a._positioned = fake

    assert _broken_error(per_head) > 1e3 * TOL


def test_the_latent_norms_use_their_own_epsilon():
    """transformers' q_a_layernorm and kv_a_layernorm keep RMSNorm's default 1e-6 whatever
    rms_norm_eps says (1e-5 here): the model's eps there moves the output."""
    a_config_eps = 1e-5

    def model_eps(a):
        a.q_latent_norm.eps = a.kv_latent_norm.eps = a_config_eps

    assert _broken_error(model_eps) > 1e3 * TOL


# --------------------------------------------------------------------------------------------
# bad settings


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(kv_lora_rank=0), r"kv_lora_rank must be a positive int, got 0"),
        (dict(q_lora_rank=1.5), r"q_lora_rank must be a positive int or None, got 1.5"),
        (dict(qk_rope_head_dim=5), r"qk_rope_head_dim must be even"),
        (dict(norm_eps=0), r"norm_eps must be a finite number > 0"),
    ],
)
def test_bad_mla_configs_are_named(kw, match):
    base = dict(q_lora_rank=CQ, kv_lora_rank=CKV, qk_nope_head_dim=NOPE,
                qk_rope_head_dim=ROPE, v_head_dim=EV)  # fmt: skip
    with pytest.raises(ValueError, match=match):
        MLAConfig(**{**base, **kw})


def test_bad_modules_are_named():
    mla = MLAConfig(CQ, CKV, NOPE, ROPE, EV)
    with pytest.raises(ValueError, match=r"rope.d_head=8 must equal mla.qk_rope_head_dim=6"):
        LatentAttention(M, H, mla, rope=RotaryEmbedding(8))
    with pytest.raises(TypeError, match=r"mla must be a qkv.nn.MLAConfig"):
        LatentAttention(M, H, {"kv_lora_rank": 3})
    a = LatentAttention(M, H, mla)
    with pytest.raises(ValueError, match=r"x must have shape \(B, S, d_model=44\)"):
        a(torch.zeros(1, 3, 45))
    with pytest.raises(NotImplementedError, match=r"qkv.distributed.shard does not run it"):
        a._project(torch.zeros(1, 3, M))
