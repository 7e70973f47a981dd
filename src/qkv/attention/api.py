"""`attention` and `attention_weights`: the engine's public functions and backend dispatch."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import torch
from torch import Tensor

from . import fused_cpu, scoring
from .builds import BuildFailures
from .reference import Intermediates, reference
from .sdpa import lse_supported, sdpa, sdpa_lse, unsupported
from .spec import MaskMod, ScoreMod, Spec, make_spec
from .tiled import tiled, tiled_refuses_bias

BACKENDS = ("auto", "reference", "tiled", "sdpa", "fused", "triton")
# devices on which `auto` may take the Triton forward (tests add "cpu" under TRITON_INTERPRET)
TRITON_AUTO_DEVICES: tuple[str, ...] = ("cuda",)
# the largest head dim for which `auto` sends a gradient to the Triton backward
TRITON_GRAD_MAX_D = 128


def _triton_attention(q: Tensor, k: Tensor, v: Tensor, spec: Spec) -> tuple[Tensor, Tensor]:
    """The triton backend, imported on first use so `import qkv` never needs Triton."""
    try:
        from .triton_kernel import triton_attention
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != "triton":
            raise
        raise ImportError(
            "backend='triton' needs Triton (Linux + CUDA): pip install triton; "
            "or use backend='tiled'"
        ) from e
    return triton_attention(q, k, v, spec)


def choose_backend(q: Tensor, k: Tensor, v: Tensor, spec: Spec, return_lse: bool) -> str:
    """`auto`: see `_choose`; on CPU, `fused` replaces `tiled` for a sliding window, a
    mask_mod or a score mod it can compute (measured 1.1–3.8× tiled's forward there,
    benchmarks/RESULTS.md); plain and causal requests keep SDPA / tiled, which are faster.
    On CUDA, `triton` replaces `tiled` for what it computes (windows, sinks, softcap, ALiBi, an
    LSE SDPA's kernels cannot return): its forward measured 14× tiled's for a window of 256 at
    32k tokens on an H200 (issue 15); its backward took 0.58–0.66× SDPA's backward time there (bf16,
    D = 128, N = 4096 and 16384), where tiled's forward+backward took 0.07–0.09× SDPA's.
    With a gradient, for D ≤ 128 only (`_triton_forward_fits`)."""
    return _route(q, k, v, spec, return_lse)[0]


def _route(q: Tensor, k: Tensor, v: Tensor, spec: Spec, return_lse: bool) -> tuple[str, bool]:
    """`choose_backend`, and whether `attention` repairs SDPA's answer on the device
    (`_sdpa_repairs`, decided once per call)."""
    backend, repairs = _choose(q, k, v, spec, return_lse)
    compiling = torch.compiler.is_compiling()  # a traced graph cannot branch on q's values
    if backend == "sdpa" and q.device.type == "cpu" and not compiling and not _sum_finite(q):
        backend = "tiled"
    if backend == "sdpa":
        return backend, repairs
    if backend != "tiled" or not (spec.Sq and spec.Sk):
        return backend, False
    special = spec.left is not None or spec.mask_mod is not None or spec.has_mods
    special = special or spec.sinks is not None
    if special and fused_cpu.supported(q, spec) is None:
        return "fused", False
    if not compiling and _triton_forward_fits(q, k, v, spec):
        return "triton", False
    return backend, False


# where this process's Triton could not build the forward kernels (by dtype and head dim)
_TRITON_BROKEN = BuildFailures(
    "the Triton kernel",
    "backend='auto' runs 'tiled' (or checks K/V on the host) instead",
    " Pass backend='triton' to see the full error.",
)


def _triton_build_failed(e: Exception, q: Tensor, spec: Spec) -> bool:
    """Whether `e` is Triton failing to compile or fit the kernel on this GPU (its
    `TritonError`s: CompilationError, OutOfResources, PTXASError). Then `auto` warns once, runs
    `tiled` (the same numbers within the error budget) and never tries Triton again here for
    q's dtype and head dim (`builds.BuildFailures`)."""
    from .triton_kernel import build_error

    if not build_error(e):
        return False
    _TRITON_BROKEN.record(e, q.dtype, spec.D, stacklevel=3)
    return True


def _triton_forward_fits(q: Tensor, k: Tensor, v: Tensor, spec: Spec) -> bool:
    """Whether `auto` may run this request on the Triton kernels: a device in
    `TRITON_AUTO_DEVICES`, Triton importable, a request they support; with a gradient to take,
    head dims D ≤ TRITON_GRAD_MAX_D (on an H200: bf16 D = 128 built and timed by
    benchmarks/triton_tune.py, 0.58–0.66× SDPA's backward; fp32/bf16 D ≤ 64 passed
    tests/attention/test_triton.py there). A backward Triton cannot build on some GPU falls
    back to tiled's (`triton_kernel._backward`)."""
    if not _triton_usable(q, spec):
        return False
    return spec.D <= TRITON_GRAD_MAX_D or not scoring.needs_grad(q, k, v, spec.sinks)


def _triton_usable(q: Tensor, spec: Spec) -> bool:
    """A device in `TRITON_AUTO_DEVICES`, a Triton that imports and has not failed to build
    for q's dtype and head dim, a request the kernels compute (`triton_kernel.unsupported`)."""
    if q.device.type not in TRITON_AUTO_DEVICES or _TRITON_BROKEN.broken(q.dtype, spec.D):
        return False
    kernels = _triton_kernel()
    return kernels is not None and kernels.unsupported(q, spec) is None


@functools.cache
def _triton_kernel():
    """`triton_kernel`, imported once (an import statement per call costs microseconds on the
    hot path), or None where Triton (or a working one) cannot be imported: tiled computes the
    same there."""
    try:
        from . import triton_kernel
    except ImportError:
        return None
    return triton_kernel


def _sdpa_repairs(q: Tensor, k: Tensor, v: Tensor, spec: Spec) -> bool:
    """Whether `auto` runs SDPA on this masked request without first checking K/V for NaN/inf
    (a host sync: ~60 µs on an H200, more than SDPA's own 52 µs at B4 H16 N1024 D128) and
    instead lets `triton_kernel.repair` recompute any query row whose output came back
    non-finite: every leak of a masked NaN/inf through SDPA is a NaN there (0·NaN, 0·inf,
    NaN + −inf), so checking the output finds it. With a gradient to take, `sdpa_checked`
    checks SDPA's gradients on the device likewise (head dims D ≤ TRITON_GRAD_MAX_D, which
    the Triton backward serves). No sinks, a request the Triton kernels compute (causal: they
    take no mask tensor), not under torch.compile."""
    if torch.compiler.is_compiling() or spec.sinks is not None or not spec.masked:
        return False
    if scoring.needs_grad(q, k, v) and spec.D > TRITON_GRAD_MAX_D:
        return False
    return _triton_usable(q, spec)


def _repaired(
    q: Tensor, k: Tensor, v: Tensor, spec: Spec, out: Tensor, lse: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """`triton_kernel.repair` of SDPA's (out, lse); where Triton cannot build the kernel on
    this GPU (`_triton_build_failed` warns once), the K/V check it replaces, then tiled."""
    from .triton_kernel import repair

    try:
        return repair(q, k, v, spec, out, lse)
    except Exception as e:
        if not _triton_build_failed(e, q, spec):
            raise
    if scoring.all_finite(k, v):
        return out, lse
    return tiled(q, k, v, spec)


def _sum_finite(q: Tensor) -> bool:
    """Whether q holds no NaN/inf (a finite sum proves it; ~2 µs for a decode step's q).
    PyTorch's CPU SDPA kernels return 0, not NaN, for a query row holding NaN (torch 2.13;
    its math kernel and every other backend here give NaN), so `auto` keeps such a call off
    them; an overflowing sum sends a finite q to tiled too, which is exact anyway. Not under
    torch.compile, whose graph keeps SDPA."""
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    return math.isfinite(q.sum(dtype=wide).item())


def _unseen_keys(spec: Spec) -> int:
    """How many leading keys no query row keeps: with a window's left side, row 0 (at position
    δ) keeps nothing before δ − left, and later rows less. Dropping them changes nothing (their
    weights are exactly 0; the band keeps its bottom-right alignment; their gradients are 0) but
    the work: a decode step (Sq = 1) of a sliding-window layer becomes plain attention over its
    last left + 1 keys (gemma3 at 2048 tokens: 3.7 ms → SDPA). Not with a mask_mod or
    score_mod (they see key indices) or dropout (its draws are laid out over all keys)."""
    if spec.left is None or spec.Sq == 0 or spec.mask_mod is not None:
        return 0
    if spec.score_mod is not None or spec.dropout_p > 0:
        return 0
    return max(0, spec.delta - spec.left)


def _choose(q: Tensor, k: Tensor, v: Tensor, spec: Spec, return_lse: bool) -> tuple[str, bool]:
    """`auto`: the fastest backend that computes exactly what was asked, and whether SDPA's
    answer is then repaired (`_sdpa_repairs`; False for every other backend).

    SDPA (fused C++/CUDA) for plain, causal and tensor-masked attention, and with the LSE where
    one of PyTorch's fused kernels returns it (no gradient needed, plain or causal; see
    `lse_supported`); our tiled kernel when the request needs a differentiable LSE, a mod, a
    generator-driven dropout, block skipping (window, mask_mod), or when NaN/inf sit in K/V under
    a mask (SDPA would leak them: 0·NaN = NaN). That check costs one host sync; on CUDA without
    a gradient `_sdpa_repairs` replaces it with a repair of SDPA's output that needs none.
    Also tiled for fp16/bf16 on CPU when a gradient or the LSE is asked for: PyTorch's CPU
    kernels fail flash-attn's own backward test there (fp16, 2 keys, d=64, causal: dq 6.3e-3
    off float64 against an allowance of 4.3e-3) and return an LSE 6e-5 off (tiled: 1e-6), see
    tests/attention/test_peers.py; tiled keeps scores, LSE and dP in fp32.
    """
    needs_grad = scoring.needs_grad(q, k, v)
    half = q.dtype in (torch.float16, torch.bfloat16)
    if q.device.type == "meta":  # shapes only: the backends that never read a value
        return ("sdpa" if unsupported(spec) is None and not return_lse else "reference"), False
    if spec.bias is not None and spec.bias.requires_grad and torch.is_grad_enabled():
        # a learned bias: SDPA and the reference differentiate it, tiled and fused do not
        sdpa_ok = not return_lse and unsupported(spec) is None and spec.dropout_p == 0
        sdpa_ok = sdpa_ok and not (half and q.device.type == "cpu") and scoring.all_finite(k, v)
        return ("sdpa" if sdpa_ok else "reference"), False  # checked: no Triton takes a bias
    if half and q.device.type == "cpu" and (needs_grad or return_lse):
        return "tiled", False
    if spec.sinks is not None:  # SDPA has no sink term, but its LSE lets one be folded in
        bare = dataclasses.replace(spec, sinks=None)
        ok = not half and lse_supported(q, k, v, bare)
        repairs = bare.masked and _sdpa_repairs(q, k, v, bare)
        checked = not bare.masked or repairs or scoring.all_finite(k, v)
        return ("sdpa", repairs) if ok and checked else ("tiled", False)
    if return_lse and lse_supported(q, k, v, spec):
        repairs = spec.masked and _sdpa_repairs(q, k, v, spec)
        checked = not spec.masked or repairs or scoring.all_finite(k, v)
        return ("sdpa", repairs) if checked else ("tiled", False)
    if spec.Sq == 0 or spec.Sk == 0 or return_lse or unsupported(spec) is not None:
        return "tiled", False
    if spec.dropout_p > 0 or spec.left is not None or spec.mask_mod is not None:
        return "tiled", False
    if spec.right is not None and spec.right != 0:
        return "tiled", False
    repairs = spec.masked and _sdpa_repairs(q, k, v, spec)
    if spec.masked and not repairs and not scoring.all_finite(k, v):
        return "tiled", False
    return "sdpa", repairs


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    mask: Tensor | None = None,
    mask_mod: MaskMod | None = None,
    score_mod: ScoreMod | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    sinks: Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact soft lookup: each query row blends the values by softmax(scale·q·kᵀ).

    Shapes: q (B, Hq, Sq, D), k (B, Hk, Sk, D), v (B, Hk, Sk, Dv) → out (B, Hq, Sq, Dv);
    with `return_lse=True` also lse (B, Hq, Sq), fp32 (fp64 for fp64 input), natural log.
    GQA/MQA: Hq % Hk == 0 and query head h reads kv head h // (Hq // Hk).

    Order: s = scale·q·k (scale defaults to 1/√D) → softcap c·tanh(s/c) → score_mod →
    masks (−inf) → softmax in fp32 → dropout, scaled 1/(1−p) → ·v.

    Precision: for fp16/bf16 inputs the scores q·k are summed in fp32 and never rounded to the
    input dtype; softcap, mods, softmax, the LSE and the backward's dP stay fp32 (as in
    FlashAttention); out and the gradients come back in the input dtype.

    Alignment: query row i sits at absolute position i + δ with δ = Sk − Sq (bottom-right), so
    `causal=True` keeps key j iff j ≤ i + δ. For Sq=2, Sk=5::

        1 1 1 1 0
        1 1 1 1 1

    This is flash-attn's (≥ 2.1) causal and SDPA's `attn_mask=causal_lower_right(Sq, Sk)`
    (`torch.nn.attention.bias`), not SDPA's `is_causal=True`, which is top-left aligned (keeps
    j ≤ i) and differs whenever Sq ≠ Sk. With Sq > Sk the first Sq − Sk rows keep no key.

    `window=(left, right)` keeps i+δ−left ≤ j ≤ i+δ+right (inclusive; None = unbounded);
    `(W−1, 0)` attends exactly the W most recent keys. `mask` is bool (True = keep) or a float
    additive bias, broadcastable to (B, Hq, Sq, Sk). `mask_mod`/`score_mod` are FlexAttention-style
    functions of index tensors; ready ones are `qkv.causal_mask`, `qkv.sliding_window_mask`,
    `qkv.document_mask`, `qkv.key_padding_mask`, `qkv.prefix_lm_mask`, `qkv.alibi`, `qkv.softcap`,
    combined by `qkv.and_masks`/`qkv.or_masks` (`help(qkv.document_mask)`; the module:
    `from qkv.attention import mods`). All masks combine by AND.

    A row with no key left returns 0 with LSE −inf and zero gradients, never NaN. NaN/inf in a
    masked-out key or value never reaches the output (on every backend but an explicit "sdpa",
    which is PyTorch's kernel as it is: there 0·NaN is NaN. "auto" on CUDA runs causal SDPA,
    then recomputes with the Triton kernel any row that came back non-finite, and with a
    gradient (D ≤ 128) redoes SDPA's gradients by the Triton backward if they came back
    non-finite, with no host sync (`qkv.attention.sdpa_checked`); for masks the Triton kernels
    do not take, on CPU, or under `create_graph=True`, it checks K/V on the host, one sync;
    "triton", and "auto" where it runs Triton, check their own answer likewise, and the Triton
    backward its own tiles).
    A kept non-finite key makes its rows NaN; a kept NaN/inf value makes NaN the features of
    the rows that weight it ("fused" keeps plain arithmetic's ±inf for an infinite value).
    Where the answer is checked instead of K/V ("triton", with or without a gradient, and
    "auto" where it runs Triton or repairs SDPA) or nothing is masked ("auto" on SDPA), a kept
    key whose score is −inf (an infinite component) weighs 0, as in plain arithmetic: the
    answer cannot show it. Gradients through a
    kept non-finite key or value are NaN or plain arithmetic's, by backend and tile; only the
    masked ones are guaranteed to stay out.

    `sinks` (Hq,): learned attention sinks (gpt-oss; StreamingLLM's sink as a parameter). Each
    row of head h gets one more softmax logit σ_h with no value behind it, so its weights sum
    to 1 − exp(σ_h − lse) and a head can attend to "nothing":
    `w = softmax([ℓ, σ_h])[:-1]`, `lse = log(Σ_j exp ℓ_j + exp σ_h)` (an empty row: out 0, LSE
    σ_h). Differentiable (∂L/∂σ_h = −Σ_{b,i} exp(σ_h − lse)·(rowsum(dO∘O) − dlse)); on
    "tiled", "fused", "triton" and "reference"; "auto" also runs inference (no gradient,
    fp32/fp64, plain or causal) on SDPA, folding the sinks into its out and LSE (a decode step:
    ~0.6 ms vs ~4 ms on tiled at 4096 keys, 8 heads). backend="sdpa" refuses sinks.

    Gradients flow to q, k, v on every backend (and to a float `mask` on "reference"/"sdpa").
    Second derivatives (`create_graph=True`: gradient penalties, Hessian-vector products)
    recompute the forward through the reference, O(Sq·Sk) memory, and are refused with
    dropout on "tiled"/"fused". Under `torch.func` transforms "auto" runs the reference.
    `torch.compile` traces every backend, with graph breaks where a step reads values on the
    host (masks and the K/V finiteness check, the tiled loops); `fullgraph=True` needs a call
    SDPA serves without such a check: plain attention, or `backend="sdpa"`.

    Backends: "reference" (explicit, O(Sq·Sk) memory, the oracle), "tiled" (online softmax,
    O(N) memory, custom backward, skips masked-out key blocks), "sdpa" (PyTorch's fused kernel,
    exact requests only; its CPU kernels return 0, not NaN, for a query row holding NaN: "auto"
    checks), "fused" (CPU: one compiled loop per query block for windows, mask_mods, softcap and
    ALiBi, with a cached block mask, tiled's backward; what it cannot compute exactly runs on
    tiled), "triton" (FlashAttention-2-style forward and backward kernels for CUDA;
    plain/causal/window/GQA, sinks, `softcap=` and the score mods `qkv.softcap(c)` and
    `qkv.alibi(slopes)` only; "auto" takes them on CUDA for windows, sinks, softcap, ALiBi
    and LSEs that SDPA cannot serve, with gradients for D ≤ 128), "auto" (the fastest
    exact one). Equivalent PyTorch::

        s = (q @ k.repeat_interleave(Hq // Hk, 1).transpose(-1, -2)) * scale
        s = s.masked_fill(~keep, float("-inf"))
        out = torch.softmax(s.float(), -1).to(v.dtype) @ v.repeat_interleave(Hq // Hk, 1)
    """
    kw = dict(causal=causal, window=window, mask=mask, mask_mod=mask_mod, score_mod=score_mod,
              scale=scale, softcap=softcap, dropout_p=dropout_p, generator=generator, sinks=sinks)  # fmt: skip
    k, v, spec, backend, auto, repairs = _plan(q, k, v, kw, return_lse, backend)
    if backend == "sdpa" and auto and spec.sinks is not None:  # see _choose
        out, lse = _sdpa_sinks(q, k, v, spec, repairs)
        return (out, lse) if return_lse else out
    if backend == "sdpa" and return_lse:
        try:
            out, lse = sdpa_lse(q, k, v, spec)
        except RuntimeError:  # a GPU without that fused kernel (e.g. flash before sm80)
            if not auto:
                raise
            backend = "tiled"
        else:
            return _repaired(q, k, v, spec, out, lse) if repairs else (out, lse)
    if backend == "triton":
        try:
            out, lse = _triton_attention(q, k, v, spec)
            return (out, lse) if return_lse else out
        except Exception as e:  # only Triton's own build errors, and only under auto
            if not auto or not _triton_build_failed(e, q, spec):
                raise
            backend = "tiled"
    if backend == "reference":
        r = _reference(q, k, v, spec)
        return (r.out, r.lse) if return_lse else r.out
    if backend == "tiled":
        out, lse = tiled(q, k, v, spec)
        return (out, lse) if return_lse else out
    if backend == "fused":
        out, lse = fused_cpu.fused(q, k, v, spec)
        return (out, lse) if return_lse else out
    if repairs and scoring.needs_grad(q, k, v):
        from .sdpa_checked import sdpa_checked

        def run(*xs: Tensor) -> Tensor:
            return sdpa(*xs, spec)

        return sdpa_checked(q, k, v, spec, run, lambda o: _repaired(q, k, v, spec, o)[0])
    if repairs:
        return _repaired(q, k, v, spec, sdpa(q, k, v, spec))[0]
    return sdpa(q, k, v, spec)


def _plan(
    q: Tensor, k: Tensor, v: Tensor, kw: dict, return_lse: bool, backend: str
) -> tuple[Tensor, Tensor, Spec, str, bool, bool]:
    """`attention`'s request → (k, v, spec, backend, whether it was "auto", whether SDPA's
    answer is repaired on the device): the spec checked, the keys before every row's window
    dropped, and the backend `auto` stands for resolved."""
    spec = make_spec(q, k, v, **kw)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    if backend in ("tiled", "fused") and tiled_refuses_bias(spec):  # fused runs it on tiled
        raise ValueError(
            f"backend={backend!r} does not differentiate through a float mask; pass "
            "mask.detach(), or backend='auto', 'reference' or 'sdpa' to learn the bias"
        )
    if (s0 := _unseen_keys(spec)) > 0:  # keys before every row's window: never read them
        k, v = k[:, :, s0:], v[:, :, s0:]
        mask = kw["mask"]
        if mask is not None and mask.dim() > 0 and mask.shape[-1] == spec.Sk:
            mask = mask[..., s0:]
        spec = make_spec(
            q, k, v, causal=kw["causal"], window=kw["window"], mask=mask, scale=spec.scale,
            softcap=kw["softcap"], sinks=kw["sinks"],
        )  # fmt: skip
    auto, repairs = backend == "auto", False
    if q.device.type == "meta" and backend in ("tiled", "fused"):  # triton: CUDA only
        raise ValueError(
            f"backend={backend!r} reads values as it runs, which meta tensors do not have; "
            "use backend='auto' (or 'sdpa', 'reference') for shapes on the meta device"
        )
    if scoring.transforms_active():  # torch.func.grad/vmap/jacrev/…
        if auto:
            backend = "reference"
        elif backend in ("tiled", "fused", "triton"):
            raise ValueError(
                f"backend={backend!r} has a custom autograd backward that torch.func transforms "
                "(grad, vmap, jacrev, …) cannot trace; use backend='auto' or 'reference' there"
            )
    elif auto:
        backend, repairs = _route(q, k, v, spec, return_lse)
    return k, v, spec, backend, auto, repairs


def auto_backend(q: Tensor, k: Tensor, v: Tensor, *, return_lse: bool = False, **kwargs) -> str:
    """The backend `attention(q, k, v, **kwargs, return_lse=return_lse)` runs under "auto":
    "sdpa", "tiled", "fused", "triton" or "reference". Asking for the LSE can change it (fp16/bf16 on
    CPU: SDPA without, tiled with; a mask SDPA's LSE kernels cannot take), and with the backend
    the output's last bits: `qkv.nn` recording a call for the lens checks this, so a recorded
    forward computes what an unrecorded one does."""
    return _plan(q, k, v, {**_request_defaults(), **kwargs}, return_lse, "auto")[3]


@functools.cache
def _request_defaults() -> dict:
    """`attention`'s keyword defaults that describe the request (not return_lse, backend)."""
    params = inspect.signature(attention).parameters.values()
    return {p.name: p.default for p in params
            if p.kind is p.KEYWORD_ONLY and p.name not in ("return_lse", "backend")}  # fmt: skip


def _sdpa_sinks(
    q: Tensor, k: Tensor, v: Tensor, spec: Spec, repairs: bool
) -> tuple[Tensor, Tensor]:
    """Sinks on SDPA, for `auto` (no gradient, fp32/fp64, plain or causal): the fused kernel's
    out and LSE, repaired on the device where `_choose` said so (causal on CUDA: no K/V check
    was made), then `scoring.add_sinks` in the LSE's fp32 (fp64). A decode step of a model
    with sinks (Sq = 1 over 4096 keys, 8 heads) takes ~0.6 ms this way, ~4 ms on tiled."""
    bare = dataclasses.replace(spec, sinks=None)
    out, lse = sdpa_lse(q, k, v, bare)
    if repairs:
        out, lse = _repaired(q, k, v, bare, out, lse)
    out, lse = scoring.add_sinks(out.to(lse.dtype), lse, spec.sinks)
    return out.to(q.dtype), lse


def _reference(q: Tensor, k: Tensor, v: Tensor, spec: Spec) -> Intermediates:
    """The reference backend, with an allocation failure restated in the caller's terms."""
    try:
        return reference(q, k, v, spec)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
            raise
        each = spec.B * spec.Hq * spec.Sq * spec.Sk * (8 if q.dtype == torch.float64 else 4)
        raise MemoryError(
            f"backend='reference' materialises (B, Hq, Sq, Sk) = "
            f"{(spec.B, spec.Hq, spec.Sq, spec.Sk)} scores, {each / 2**30:.3g} GiB per "
            "matrix (scores, logits, weights, …) and the allocation failed; use "
            "backend='tiled' or 'auto' (O(N) memory)"
        ) from e


def reference_attention(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Intermediates:
    """The reference backend with every intermediate (scores, logits, weights, lse, out).
    Takes the keyword arguments of `attention` (but `return_lse`/`backend`). O(Sq·Sk) memory."""
    if "return_lse" in kwargs:
        raise TypeError(
            "reference_attention takes no return_lse: it returns every intermediate, the LSE "
            "included; drop return_lse= and read .lse (and .out) of the result"
        )
    if "backend" in kwargs:
        raise TypeError(
            "reference_attention takes no backend: it always runs the reference; drop "
            f"backend=, or call qkv.attention(q, k, v, backend={kwargs['backend']!r}, ...)"
        )
    return _reference(q, k, v, make_spec(q, k, v, **kwargs))


def _rows(rows: object, Sq: int, device: torch.device) -> Tensor:
    if rows is None:
        return torch.arange(Sq, device=device)
    if isinstance(rows, slice):
        return torch.arange(Sq, device=device)[rows]
    if isinstance(rows, int) and not isinstance(rows, bool):
        rows = [rows]
    t = torch.as_tensor(rows, device=device)
    if t.dim() != 1 or t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"rows must be an int, a slice, or a 1-D sequence of ints, got {rows!r}")
    if t.numel() and (int(t.min()) < -Sq or int(t.max()) >= Sq):
        raise IndexError(f"rows must lie in [-{Sq}, {Sq}) for Sq={Sq}, got {t.tolist()}")
    return torch.where(t < 0, t + Sq, t).long()


def attention_weights(
    q: Tensor,
    k: Tensor,
    lse: Tensor | None = None,
    *,
    rows: int | slice | list[int] | Tensor | None = None,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    mask: Tensor | None = None,
    mask_mod: MaskMod | None = None,
    score_mod: ScoreMod | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Exact softmax rows for the chosen queries, (B, Hq, len(rows), Sk), without the full matrix.

    `w[b, h, r, j] = exp(logit[b, h, rows[r], j] − lse[b, h, rows[r]])`, the very weights
    `attention` used (pre-dropout), in O(len(rows)·Sk) memory. Pass the `lse` that
    `attention(..., return_lse=True)` returned, or None to compute it for these rows alone
    (also exact, same cost). Masks and mods must be those of the attention call. An empty row
    is all 0. With `sinks`, a row sums to 1 − exp(σ_h − lse), the sink's share. Equivalent:
    `reference_attention(q, k, v, ...).weights[:, :, rows]`.
    """
    spec = make_spec(
        q, k, k, causal=causal, window=window, mask=mask, mask_mod=mask_mod,
        score_mod=score_mod, scale=scale, softcap=softcap, sinks=sinks,
    )  # fmt: skip
    idx = _rows(rows, spec.Sq, q.device)
    cdt = scoring.compute_dtype(q.dtype)
    qg = scoring.group(q[:, :, idx], spec)  # (b hk (g r) d)
    kbad = scoring.bad_keys(k, spec.G)
    kk = scoring.finite(k) if kbad is not None else k
    raw = scoring.scaled_scores(qg, kk, spec)  # (b h r j), fp32 (fp64 for fp64 input)
    if spec.Sk == 0:
        return raw
    logits, _ = scoring.scores(raw, spec, scoring.block(spec, idx, 0, spec.Sk, q.device), kbad)
    if lse is None:
        m = scoring.safe_max(logits.amax(-1, keepdim=True))
        lse_r = m + torch.log(torch.exp(logits - m).sum(-1, keepdim=True))
        if spec.sinks is not None:
            lse_r = torch.logaddexp(lse_r, scoring.sink_logits(spec.sinks, lse_r).unsqueeze(-1))
    else:
        want = (spec.B, spec.Hq, spec.Sq)
        if isinstance(lse, Tensor) and not lse.is_floating_point():
            raise TypeError(
                "lse must be a floating tensor, the fp32 (fp64) LSE that "
                f"attention(..., return_lse=True) returns, got {lse.dtype}"
            )
        if not isinstance(lse, Tensor) or tuple(lse.shape) != want:
            got = tuple(lse.shape) if isinstance(lse, Tensor) else type(lse).__name__
            raise ValueError(f"lse must have shape (B, Hq, Sq) = {want}, got {got}")
        lse_r = lse[:, :, idx].to(device=q.device, dtype=cdt).unsqueeze(-1)
    lse_r = scoring.empty_rows_to_inf(lse_r)
    return torch.exp(logits - lse_r)
