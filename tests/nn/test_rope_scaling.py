"""RotaryEmbedding's `scaling` (qkv.nn.RopeScaling) against float64 formulas written here: the
complex rotation by pos · θ_p / s_p with the divisors s_p of linear scaling, Meta's Llama 3.1
rule (as its reference code states it, pair by pair), YaRN (as the paper states it: ramp over
the pairs that turn between beta_slow and beta_fast times in L, cos/sin times the attention
factor) and per-pair factors; and the Llama 3 and YaRN rules against transformers' own
`_compute_llama3_parameters` / `_compute_yarn_parameters`."""

import math

import pytest
import torch

from qkv.nn import RopeScaling, RotaryEmbedding


def llama3_divisors(d: int, base: float, factor, lo, hi, L) -> list[float]:
    """s_p of Meta's rule, one pair at a time (θ_p / s_p as the new frequency)."""
    out = []
    for p in range(d // 2):
        theta = base ** (-2.0 * p / d)
        wavelen = 2 * math.pi / theta
        if wavelen < L / hi:
            out.append(1.0)
        elif wavelen > L / lo:
            out.append(float(factor))
        else:
            t = (L / wavelen - lo) / (hi - lo)
            out.append(theta / ((1 - t) * theta / factor + t * theta))
    return out


def yarn_divisors(d: int, base: float, factor, L, fast=32.0, slow=1.0) -> list[float]:
    """s_p of YaRN (truncated range): pair p turns L·θ_p/2π times over L positions; the pairs
    from the last one turning ≥ fast times (rounded down) to the first turning ≤ slow times
    (rounded up) ramp from kept to divided by factor."""

    def pair_turning(n):  # solve L · base^(−2p/d) / 2π = n for p
        return d * math.log(L / (2 * math.pi * n)) / (2 * math.log(base))

    lo, hi = max(math.floor(pair_turning(fast)), 0), min(math.ceil(pair_turning(slow)), d - 1)
    out = []
    for p in range(d // 2):
        ramp = min(max((p - lo) / (hi - lo), 0.0), 1.0)
        theta = base ** (-2.0 * p / d)
        out.append(theta / (ramp * theta / factor + (1 - ramp) * theta))
    return out


def scaled_rope(x: torch.Tensor, pos: torch.Tensor, base: float, divisors, m=1.0) -> torch.Tensor:
    """Half-split pair p as a + ib, times m · exp(i · pos · base^(−2p/d) / s_p); float64."""
    d = x.shape[-1]
    theta = torch.tensor(
        [base ** (-2.0 * p / d) / divisors[p] for p in range(d // 2)], dtype=torch.float64
    )
    rot = torch.polar(
        torch.full((len(pos), d // 2), float(m), dtype=torch.float64), pos.double()[:, None] * theta
    )
    c = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double()) * rot
    return torch.cat((c.real, c.imag), dim=-1)


# base 500, d 10: wavelengths 6.3, 21.7, 75, 260, 900; L = 32, low 1, high 4: pair 0 kept
# (< 8), pair 1 smoothed (8 … 32), pairs 2-4 divided by the factor (> 32): all three branches
D, BASE = 10, 500.0
CASES = {
    "linear": (RopeScaling.linear(8.0), [8.0] * 5),
    "llama3": (RopeScaling.llama3(8.0, 1.0, 4.0, 32), llama3_divisors(D, BASE, 8.0, 1.0, 4.0, 32)),
    "freq_factors": (RopeScaling.freq_factors([1.0, 2.5, 4.0, 8.0, 8.0]), [1, 2.5, 4, 8, 8]),
    # pairs 0-4 turn 5.1, 1.5, 0.43, 0.12, 0.04 times over L = 32: lo 0, hi 2
    "yarn": (RopeScaling.yarn(4.0, 32), yarn_divisors(D, BASE, 4.0, 32)),
}
M = {"yarn": 0.1 * math.log(4.0) + 1}  # YaRN's cos/sin multiplier; 1 for the others


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scaled_rotation_matches_the_formula(name, dtype):
    scaling, divisors = CASES[name]
    if name == "llama3":  # the three branches are all exercised
        assert divisors[0] == 1.0 and 1.0 < divisors[1] < 8.0 and divisors[2:] == [8.0] * 3
    if name == "yarn":  # kept, ramped, divided
        assert divisors[0] == 1.0 and 1.0 < divisors[1] < 4.0 and divisors[2:] == [4.0] * 3
    x = torch.randn(2, 3, 50, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pos = torch.arange(20, 70)  # past L = 32
    rope = RotaryEmbedding(D, base=BASE, scaling=scaling)
    m = M.get(name, 1.0)
    want = scaled_rope(x, pos, BASE, divisors, m)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for got in (rope(x.to(dtype), pos), rope(x.to(dtype), 20)):  # gathered, and the slice path
        assert (got.double() - want).abs().max() <= tol * want.abs().max()
    # the fused CPU path's per-pair tables carry the same angles
    cos, sin = rope.pair_tables(70)
    ang = pos.double()[:, None] * torch.tensor(
        [BASE ** (-2.0 * p / D) / divisors[p] for p in range(D // 2)], dtype=torch.float64
    )
    assert (cos[20:70].double() - m * ang.cos()).abs().max() <= 1e-6
    assert (sin[20:70].double() - m * ang.sin()).abs().max() <= 1e-6
    # the check can fail: unscaled angles are far off
    plain = RotaryEmbedding(D, base=BASE)(x, pos)
    assert (plain - want).abs().max() > 0.1 * want.abs().max()


def test_llama3_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=8192)  # fmt: skip
    cfg = transformers.AutoConfig.for_model(
        "llama", hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", **params},
    )  # fmt: skip
    want, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](cfg)
    assert attention_factor == 1.0
    rope = RotaryEmbedding(128, base=500000.0, scaling=RopeScaling.llama3(8.0, 1.0, 4.0, 8192))
    got = rope.inv_freq()
    # transformers computes in float32
    assert ((got - want.double()).abs() / want.double()).max() <= 1e-6
    assert ((got - RotaryEmbedding(128, base=500000.0).inv_freq()).abs() / got).max() > 1


def test_linear_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.AutoConfig.for_model(
        "llama", hidden_size=64, num_attention_heads=2, rope_theta=1e4,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
    )  # fmt: skip
    want, attention_factor = ROPE_INIT_FUNCTIONS["linear"](cfg)
    got = RotaryEmbedding(32, scaling=RopeScaling.linear(4.0)).inv_freq()
    assert attention_factor == 1.0
    assert ((got - want.double()).abs() / want.double()).max() <= 1e-6


@pytest.mark.parametrize(
    ("head_dim", "base", "factor", "L", "partial"),
    [(128, 1e6, 4.0, 32768, 1.0), (10, 500.0, 4.0, 32, 1.0), (64, 1e4, 32.0, 4096, 0.5)],
)
@pytest.mark.parametrize(
    "extra",
    [{}, {"beta_fast": 8, "beta_slow": 2}, {"truncate": False},
     {"mscale": 1.0, "mscale_all_dim": 0.5}, {"attention_factor": 0.8}],
    ids=["defaults", "betas", "untruncated", "mscale", "attention_factor"],
)  # fmt: skip
def test_yarn_matches_transformers(head_dim, base, factor, L, partial, extra):
    """Qwen2.5-style (d 128, θ 1e6, × 4 from 32k), DeepSeek's mscale pair, partial rotary."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.AutoConfig.for_model(
        "qwen2", hidden_size=4 * head_dim, num_attention_heads=4, rope_theta=base,
        max_position_embeddings=int(L * factor), partial_rotary_factor=partial,
        rope_scaling={"rope_type": "yarn", "factor": factor,
                      "original_max_position_embeddings": L, **extra},
    )  # fmt: skip
    want, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    scaling = RopeScaling.yarn(factor, L, **extra)
    rope = RotaryEmbedding(head_dim, base=base, rotary_dim=int(head_dim * partial), scaling=scaling)
    got = rope.inv_freq()
    assert ((got - want.double()).abs() / want.double()).max() <= 1e-6  # transformers: float32
    assert scaling.attention_factor == pytest.approx(attention_factor, rel=1e-12)
    # the check can fail: linear scaling by the same factor is another rule
    linear = RotaryEmbedding(head_dim, base=base, rotary_dim=int(head_dim * partial),
                             scaling=RopeScaling.linear(factor)).inv_freq()  # fmt: skip
    assert ((linear - want.double()).abs() / want.double()).max() > 0.5


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: RopeScaling("ntk", 4.0), r"rope_type must be one of .*'llama3', 'yarn'.*got 'ntk'"),
        (lambda: RopeScaling("dynamic", 4.0), r"original_max_positions must be a positive int, got None"),
        (lambda: RopeScaling("yarn", 4.0), r"original_max_positions must be a positive int, got None"),
        (lambda: RopeScaling.yarn(4.0, 32, beta_fast=-1), r"beta_fast must be a finite number > 0"),
        (lambda: RopeScaling.yarn(4.0, 32, attention_factor=0.0), r"attention_factor must be a finite number > 0"),
        (lambda: RopeScaling("linear", 2.0, beta_fast=4.0), r"beta_fast belongs to rope_type 'yarn', not 'linear'"),
        (lambda: RopeScaling.linear(0.0), r"factor must be a finite number > 0, got 0.0"),
        (lambda: RopeScaling.linear(float("nan")), r"factor must be a finite number > 0"),
        (lambda: RopeScaling.llama3(8.0, 4.0, 1.0, 8192),
         r"low_freq_factor=4.0 must be < high_freq_factor=1.0"),
        (lambda: RopeScaling.llama3(8.0, 1.0, 4.0, 0), r"original_max_positions must be a positive int"),
        (lambda: RopeScaling("linear", 2.0, low_freq_factor=1.0), r"belongs to rope_type 'llama3'"),
        (lambda: RopeScaling.freq_factors([1.0, -2.0]), r"factors\[1\] must be a finite number > 0"),
        (lambda: RopeScaling.freq_factors([]), r"takes factors"),
        (lambda: RotaryEmbedding(10, scaling=RopeScaling.freq_factors([1.0, 2.0])),
         r"scaling has 2 freq_factors; rotary_dim=10 rotates 5 pairs"),
        (lambda: RotaryEmbedding(10, scaling={"rope_type": "linear"}),
         r"scaling must be a qkv.nn.RopeScaling or None, got dict"),
    ],
)  # fmt: skip
def test_bad_scaling_is_named(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


SHORT = [1.0, 1.2, 1.5, 2.0, 3.0]
LONG = [1.0, 2.0, 4.0, 8.0, 16.0]


def test_longrope_picks_its_factors_by_the_calls_last_position():
    """A call ending at position ≤ L − 1 turns pair p by pos·θ_p/short[p]; one reaching L or
    past turns all its positions (earlier ones too) by long[p]; cos/sin × √(1 + ln 4 / ln 32)."""
    L = 32
    scaling = RopeScaling.longrope(SHORT, LONG, L, factor=4.0)
    m = math.sqrt(1 + math.log(4.0) / math.log(L))
    assert scaling.attention_factor == pytest.approx(m, rel=1e-15)
    rope = RotaryEmbedding(D, base=BASE, scaling=scaling)
    x = torch.randn(1, 2, 8, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for start, divisors in [(L - 8, SHORT), (L - 7, LONG), (0, SHORT), (100, LONG)]:
        pos = torch.arange(start, start + 8)
        want = scaled_rope(x, pos, BASE, divisors, m)
        for got in (rope(x, start), rope(x, pos)):
            assert (got - want).abs().max() <= 1e-12 * want.abs().max(), (start, divisors)
        cos, sin = rope.pair_tables(start + 8)  # the fused CPU path's tables: the same choice
        ang = pos.double()[:, None] * torch.tensor(
            [BASE ** (-2.0 * p / D) / divisors[p] for p in range(D // 2)], dtype=torch.float64
        )
        assert (cos[start : start + 8].double() - m * ang.cos()).abs().max() <= 1e-6
        assert (sin[start : start + 8].double() - m * ang.sin()).abs().max() <= 1e-6
    # the check can fail: the other factors rotate position 24 differently
    assert (rope(x, 24) - scaled_rope(x, torch.arange(24, 32), BASE, LONG, m)).abs().max() > 0.1


def dynamic_theta(r: int, base: float, factor: float, L: int, n: int) -> list[float]:
    """Dynamic NTK (bloc97 / emozilla): past L, the base becomes
    base · (factor·n/L − (factor − 1))^(r/(r−2)); at or below L it stays."""
    if n > L:
        base = base * (factor * n / L - (factor - 1)) ** (r / (r - 2))
    return [base ** (-2.0 * p / r) for p in range(r // 2)]


@pytest.mark.parametrize("seq_len", [None, 16, 32, 33, 64, 200])
def test_dynamic_matches_transformers_and_the_formula(seq_len):
    """transformers' `_compute_dynamic_ntk_parameters` (L = max_position_embeddings, partial
    rotary: 10 of 20 features) and the formula in float64, for a call ending before seq_len."""
    transformers = pytest.importorskip("transformers", reason="transformers is the oracle")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.AutoConfig.for_model(
        "phi", hidden_size=40, num_attention_heads=2, rope_theta=BASE,
        max_position_embeddings=32, partial_rotary_factor=0.5,
        rope_scaling={"rope_type": "dynamic", "factor": 3.0},
    )  # fmt: skip
    want, attention_factor = ROPE_INIT_FUNCTIONS["dynamic"](cfg, seq_len=seq_len)
    scaling = RopeScaling.dynamic(3.0, 32)
    rope = RotaryEmbedding(20, base=BASE, rotary_dim=D, scaling=scaling)
    n = seq_len or 0
    got = rope.inv_freq(scaling.variant(n))
    assert ((got - want.double()).abs() / want.double()).max() <= 1e-6  # transformers: float32
    exact = torch.tensor(dynamic_theta(D, BASE, 3.0, 32, n), dtype=torch.float64)
    assert ((got - exact).abs() / exact).max() <= 1e-12
    assert attention_factor == 1.0 and scaling.cos_sin_scale == 1.0
    assert scaling.variant(n) == (n if n > 32 else None)


def test_dynamic_rotates_each_call_by_its_own_length_and_keeps_one_table():
    """A call ending past L rotates every position by the frequencies of its own length (the
    complex rotation written here); at or below L by the plain ones. Tables of one length at a
    time are kept (a decode step past L makes a new one)."""
    scaling = RopeScaling.dynamic(2.0, 16)
    rope = RotaryEmbedding(8, base=100.0, scaling=scaling)
    x = torch.randn(1, 1, 24, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for n in (10, 16, 17, 24):
        got = rope(x[:, :, :n], 0)
        theta = torch.tensor(dynamic_theta(8, 100.0, 2.0, 16, n), dtype=torch.float64)
        ang = torch.arange(n, dtype=torch.float64)[:, None] * theta  # (i, pairs)
        z = torch.complex(x[0, 0, :n, :4], x[0, 0, :n, 4:]) * torch.polar(torch.ones_like(ang), ang)
        want = torch.cat((z.real, z.imag), -1)
        assert (got[0, 0] - want).abs().max() <= 1e-12, n
    dynamic = [k for k in rope._tables if isinstance(k[2], int) and not isinstance(k[2], bool)]
    assert dynamic == [(torch.device("cpu"), torch.float64, 24)]
    step = rope(x[:, :, 20:21], 20)  # a decode step at position 20: the frequencies of n = 21
    theta = torch.tensor(dynamic_theta(8, 100.0, 2.0, 16, 21), dtype=torch.float64)
    z = torch.complex(x[0, 0, 20, :4], x[0, 0, 20, 4:]) * torch.polar(
        torch.ones(4, dtype=torch.float64), 20 * theta
    )
    assert (step[0, 0, 0] - torch.cat((z.real, z.imag))).abs().max() <= 1e-12


@pytest.mark.parametrize("seq_len", [None, 32, 33, 200])
def test_longrope_matches_transformers(seq_len):
    """transformers' `_compute_longrope_parameters` (short for seq_len ≤ L, long past it) and
    its attention factor with factor = max_position_embeddings / original (Phi-3's form)."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.AutoConfig.for_model(
        "phi3", hidden_size=40, num_attention_heads=2, rope_theta=BASE,
        max_position_embeddings=128, original_max_position_embeddings=32, partial_rotary_factor=0.5,
        rope_scaling={"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG},
    )  # fmt: skip
    want, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](cfg, seq_len=seq_len)
    scaling = RopeScaling.longrope(SHORT, LONG, 32, factor=128 / 32)
    rope = RotaryEmbedding(20, base=BASE, rotary_dim=D, scaling=scaling)
    got = rope.inv_freq(scaling.variant(seq_len or 0))
    assert ((got - want.double()).abs() / want.double()).max() <= 1e-6
    assert scaling.attention_factor == pytest.approx(attention_factor, rel=1e-12)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: RopeScaling.longrope([1.0, 2.0], [1.0], 32), r"short_factors has 2 entries, long_factors 1"),
        (lambda: RopeScaling.longrope([], [], 32), r"takes short_factors, got \(\)"),
        (lambda: RopeScaling.longrope([1.0], [0.0], 32), r"long_factors\[0\] must be a finite number > 0"),
        (lambda: RopeScaling.longrope([1.0], [1.0], 0), r"original_max_positions must be a positive int"),
        (lambda: RotaryEmbedding(10, scaling=RopeScaling.longrope([1.0] * 4, [1.0] * 4, 32)),
         r"scaling has 4 short_factors; rotary_dim=10 rotates 5 pairs"),
    ],
)  # fmt: skip
def test_bad_longrope_is_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()
