"""Text generation shared by every decoder: prompt → ids (chat templates included), greedy or
sampled next tokens with a KV cache, and text streaming that never splits a UTF-8 character.

A decoder gets it by inheriting `Generation`. The id loop (`generate_ids`: greedy or sampled,
KV cache, stop ids, context limit) needs `config` (n_layers, max_positions, end_ids, name),
`hidden(ids, cache=...)` (final-norm states (b i m)) and `unembed(h)` (… m → … v). The text
layer (`generate`) adds `tokenizer` and `chat_template`, read by `encode_prompt` and `_pieces`;
a model with another kind of tokenizer overrides those two (`models.tiny`: symbols) and hands
its pieces to `deliver`.

Letters: b batch, i position, m model dim, v vocabulary.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..nn import KVCache, RotaryEmbedding
from .gguf import render_chat
from .tokenizer import Tokenizer, no_tokenizer


class Generation:
    """`generate` (text in, text out, optionally streamed) and `generate_ids` (ids in, ids out)
    for a decoder; see the module docstring for what the host class provides."""

    def encode_prompt(
        self, prompt: str | Sequence[dict[str, str]], *, chat: bool = False
    ) -> list[int]:
        """Prompt → token ids. `chat=True` (or a list of {"role", "content"} messages) renders the
        GGUF's chat template with the assistant turn opened, as transformers' apply_chat_template."""
        tok = self._tokenizer()
        if not isinstance(prompt, str):
            if not chat:
                raise TypeError(
                    f"prompt must be a str (or a list of messages with chat=True), got {type(prompt).__name__}"
                )
            messages = list(prompt)
            if not messages or not all(
                isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages
            ):
                raise ValueError(
                    'messages must be a non-empty list of {"role": ..., "content": ...} dicts'
                )
        else:
            if not prompt.strip():
                raise ValueError(
                    f"prompt is {'empty' if not prompt else 'only whitespace'}: pass some text "
                    "to continue"
                )
            messages = [{"role": "user", "content": prompt}]
        if chat:
            if not self.chat_template:
                raise ValueError(
                    f"{self.config.name} has no chat template; call generate with chat=False"
                )
            prompt = render_chat(self.chat_template, messages, add_generation_prompt=True)
        return tok.check_ids(tok.backend.encode(prompt, add_special_tokens=True).ids)

    def generate_ids(
        self,
        ids: Sequence[int],
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int | None = None,
        stop_ids: Sequence[int] | None = None,
        use_cache: bool = True,
    ) -> Iterator[int]:
        """An iterator over up to `max_new_tokens` new token ids after `ids` (a stop id is yielded,
        then it ends). Arguments are checked at the call; tokens are computed as it is consumed.

        temperature 0 → greedy (argmax); otherwise sample softmax(logits / temperature) over the
        `top_k` most likely tokens (all if None) with a generator seeded by `seed`. `use_cache`
        keeps a KV cache (one token per step); False recomputes the whole sequence each step (the
        slow oracle: same tokens). Generation also stops when the context is full.
        """
        c = self.config
        ids = _as_ids(ids)
        if not ids:
            raise ValueError("no prompt tokens: generation needs at least one")
        _check_sampling(max_new_tokens, temperature, top_k, seed)
        stop = set(c.end_ids if stop_ids is None else stop_ids)
        gen = None
        if temperature > 0:
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
        steps = min(max_new_tokens, c.max_positions - len(ids) + 1)
        if steps <= 0:
            raise ValueError(
                f"prompt is {_tokens(len(ids))}, beyond {c.name}'s context of {c.max_positions}"
            )
        return self._decode(ids, steps, temperature, top_k, gen, stop, use_cache)

    @torch.inference_mode()  # as a decorator: active only while the generator runs, not between yields
    def _decode(
        self,
        ids: list[int],
        steps: int,
        temperature: float,
        top_k: int | None,
        gen: torch.Generator | None,
        stop: set[int],
        use_cache: bool,
    ) -> Iterator[int]:
        c = self.config
        device = next(self.parameters()).device
        cache = KVCache(c.n_layers) if use_cache else None
        switch = longrope_switch(self) if use_cache else None
        seq = torch.tensor([ids], dtype=torch.long, device=device)  # (1 i)
        for step in range(steps):
            # the whole sequence again: the prompt, and the first step past LongRoPE's L, whose
            # long factors re-rotate every key (transformers' Phi-3 drops its cache there too)
            whole = step == 0 or seq.shape[1] == switch
            one_row = cache is not None and not whole and device.type == "cpu"
            with step_threads(STEP_THREADS) if one_row else contextlib.nullcontext():
                if cache is None:
                    h = self.hidden(seq)[:, -1]  # (1 m)
                elif whole:
                    cache = KVCache(c.n_layers)
                    h = self.hidden(seq, cache=cache)[:, -1]
                    cache.reserve(min(c.max_positions, len(ids) + steps))
                else:
                    h = self.hidden(seq[:, -1:], cache=cache)[:, -1]
                nxt = _pick(self.unembed(h)[0], temperature, top_k, gen)
            yield nxt
            if nxt in stop or step == steps - 1:
                return
            seq = torch.cat((seq, torch.tensor([[nxt]], dtype=torch.long, device=device)), 1)

    def generate(
        self,
        prompt: str | Sequence[dict[str, str]],
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        chat: bool = False,
        seed: int | None = None,
        stream: Callable[[str], Any] | bool | None = None,
        truncate: bool = False,
    ) -> str | Iterator[str]:
        """Continue `prompt` (or answer it, `chat=True`) with up to `max_new_tokens` tokens.

        Returns the new text; with `stream=callback`, also calls `callback(piece)` as each piece
        is decoded; with `stream=True`, returns an iterator of pieces instead. Stops at the EOS
        token (`<|im_end|>` for SmolLM2), which is not part of the text.

        Raises ValueError for an empty prompt and for a prompt that leaves no room for
        `max_new_tokens` within the context (`truncate=True` keeps its last tokens instead).
        """
        c = self.config
        _check_sampling(max_new_tokens, temperature, top_k, seed)
        ids = self.encode_prompt(prompt, chat=chat)
        room = c.max_positions - max_new_tokens  # prompt tokens that fit beside the new ones
        if len(ids) > room:
            if not truncate:
                raise ValueError(_no_room(c.name, c.max_positions, len(ids), max_new_tokens))
            ids = ids[-max(room, 1) :]  # room < 1: one token, then generate_ids stops when full
        new_ids = self.generate_ids(
            ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed
        )
        return deliver(self._pieces(new_ids), stream)

    def _pieces(self, new_ids: Iterator[int]) -> Iterator[str]:
        """Token ids → text pieces, held back while a UTF-8 character is split across tokens."""
        tok, stop = self._tokenizer(), self.config.end_ids
        pending: list[int] = []
        for i in new_ids:
            if i in stop:
                break
            pending.append(i)
            text = tok.decode(pending)
            if text and not text.endswith("\ufffd"):
                yield text
                pending = []
        if pending and (text := tok.decode(pending)):
            yield text

    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise no_tokenizer(
                self.config.name,
                needs="generate reads and writes text",
                python="With token ids, call generate_ids(ids) and decode the ids yourself",
            )
        return self.tokenizer


# PyTorch threads of a cached one-token decode step on CPU (see `step_threads`), or None to
# keep the caller's count. One thread measured no slower with short contexts and far steadier
# when another process holds a core; with a 2048-token context two idle cores were ~4 % faster
# (benchmarks/RESULTS.md, "Decode steps on one thread").
STEP_THREADS: int | None = 1
_LOCK = threading.Lock()
_open, _saved = 0, 1  # blocks open in any Python thread, and the count to restore after them


def longrope_switch(model: nn.Module) -> int | None:
    """The sequence length L + 1 at which a model with LongRoPE (any `RotaryEmbedding` whose
    scaling is "longrope", L its original_max_positions) turns to its long factors, or None.
    Keys cached by shorter calls were rotated by the short ones: a cached decode re-runs the
    whole sequence there, once."""
    for m in model.modules():
        if (
            isinstance(m, RotaryEmbedding)
            and m.scaling is not None
            and m.scaling.rope_type == "longrope"
        ):
            return m.scaling.original_max_positions + 1
    return None


@contextlib.contextmanager
def step_threads(n: int | None) -> Iterator[None]:
    """PyTorch's CPU ops on `n` threads inside the block (None: unchanged); the caller's count
    is restored when the last block still open (in any Python thread) ends.

    A one-token decode step on CPU is ~100 small kernels of one row each: on more threads each
    pays a fork/join that costs more than it saves, and where another process keeps a core busy,
    every join waits for a descheduled thread (benchmarks/RESULTS.md: smollm2 decode). PyTorch's
    thread count is process-wide: other Python threads' CPU ops also run on `n` meanwhile."""
    global _open, _saved
    if n is None:
        yield
        return
    with _LOCK:
        if _open == 0:
            _saved = torch.get_num_threads()
            if _saved != n:
                torch.set_num_threads(n)
        _open += 1
    try:
        yield
    finally:
        with _LOCK:
            _open -= 1
            if _open == 0 and torch.get_num_threads() != _saved:
                torch.set_num_threads(_saved)


def deliver(
    pieces: Iterator[str], stream: Callable[[str], Any] | bool | None
) -> str | Iterator[str]:
    """The text layer's way out: `stream=True` → `pieces` itself (an iterator, computed as it
    is consumed); None → the joined text; a callable → the joined text, after calling
    `stream(piece)` as each piece is decoded. TypeError for anything else, before any work."""
    if stream is True:
        return pieces
    if stream is not None and not callable(stream):
        raise TypeError(f"stream must be a callable, True or None, got {type(stream).__name__}")
    out = []
    for piece in pieces:
        out.append(piece)
        if stream is not None:
            stream(piece)
    return "".join(out)


def _tokens(n: int, what: str = "token") -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _no_room(name: str, context: int, n_prompt: int, max_new: int) -> str:
    """Why a prompt of `n_prompt` tokens and `max_new` new ones do not fit `context`, and what
    each way out does (`generate`'s truncate=True keeps the last max(context − max_new, 1))."""
    room = context - max_new
    ctx = f"{name}'s context of {_tokens(context)}"
    lower = f"lower max_new_tokens to at most {context - n_prompt}"
    if room < 1:  # max_new_tokens alone fills the context
        return (
            f"max_new_tokens={max_new} alone {'fills' if room == 0 else 'exceeds'} {ctx}, "
            f"leaving no room for the prompt ({_tokens(n_prompt)}); "
            + (lower if n_prompt < context else "lower max_new_tokens and shorten the prompt")
            + (
                ", or pass truncate=True (keeps only the prompt's last token)"
                if room == 0  # generate_ids never feeds back the last new token
                else ". Truncating the prompt cannot make room: truncate=True would keep only "
                "its last token and stop when the context is full (at most "
                f"{_tokens(context, 'new token')}, not {max_new})"
            )
        )
    return (
        f"prompt is {_tokens(n_prompt)}; with max_new_tokens={max_new} that exceeds {ctx}. "
        + ("Shorten it, " + lower + "," if n_prompt < context else "Shorten it")
        + f" or pass truncate=True (keeps the last {_tokens(room, 'prompt token')})"
    )


def _as_ids(ids: object) -> list[int]:
    """`ids` (a sequence of ints, a 1-D integer tensor or array) as a list of Python ints."""
    if isinstance(ids, str | bytes) or not isinstance(ids, Iterable):
        hint = "; to continue text, call generate(prompt)" if isinstance(ids, str) else ""
        raise TypeError(
            f"ids must be a sequence of ints (token ids), got {type(ids).__name__}{hint}"
        )
    if isinstance(ids, Tensor):
        if ids.dim() != 1:
            raise ValueError(
                f"ids must be one sequence (1-D) of token ids, got a tensor of shape "
                f"{tuple(ids.shape)}" + ("; pass ids[0]" if ids.dim() == 2 else "")
            )
        ids = ids.tolist()
    out = list(ids)
    for n, i in enumerate(out):
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(
                f"ids must be a sequence of ints (token ids), got {type(i).__name__} "
                f"{i!r} at ids[{n}]"
            )
    return [int(i) for i in out]


def _check_sampling(
    max_new_tokens: object, temperature: object, top_k: object, seed: object = None
) -> None:
    if (
        not isinstance(max_new_tokens, int)
        or isinstance(max_new_tokens, bool)
        or max_new_tokens <= 0
    ):
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if (
        not isinstance(temperature, int | float)
        or isinstance(temperature, bool)
        or not 0 <= temperature < math.inf  # False for nan
    ):
        raise ValueError(
            f"temperature must be a finite number ≥ 0 (0 = greedy), got {temperature!r}"
        )
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k <= 0):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")


def _pick(
    logits: Tensor, temperature: float, top_k: int | None, gen: torch.Generator | None
) -> int:
    """Next token from logits (v): argmax at temperature 0, else a (top-k) sample."""
    if temperature == 0:
        return int(torch.argmax(logits))
    # float64, the largest logit moved to 0 first (softmax is shift-invariant): a temperature
    # as small as 1e-300 then makes 0 and −inf, never 0/0
    logits = logits.double()
    logits = (logits - logits.max()) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1).cpu()  # the seeded generator is a CPU one, on any device
    return int(torch.multinomial(probs, 1, generator=gen))
