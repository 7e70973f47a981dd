"""Triton's CPU interpreter, made quicker for the suite without changing what a kernel computes.

Two costs of the interpreter (triton 3.9) are debugging aids that compiled kernels do not have:
- every call of a `@triton.jit` helper inside a kernel patches `triton.language` again, though
  the launch has already patched those same module objects (about 1 ms a call, thousands of
  calls a test);
- every int32 add, sub and mul is redone in int64 and compared with int32's range, and the
  result is then dropped: the assert it feeds runs only with `debug` (TRITON_DEBUG=1), as in
  compiled kernels.

Together they were 2.5–4× a gradient test's time, and the second checked nothing. `quicker()`
drops both. `overflow_checked()` turns the int32 checks on for real (with `debug`, so that
their asserts fire) around the tests that are about them (test_triton.py's
`test_int32_index_math_does_not_overflow*`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

from triton.runtime import interpreter as _interp


def _options():
    return getattr(getattr(_interp, "interpreter_builder", None), "options", None)


def _has_checks() -> bool:
    options = _options()
    return hasattr(options, "sanitize_overflow") and hasattr(options, "debug")


def _set_overflow_checks(on: bool) -> None:
    """Compute and assert the int32 checks (`on`), or neither; nothing where this Triton's
    interpreter has no such options."""
    if _has_checks():
        _interp.interpreter_builder.options = dataclasses.replace(
            _options(), sanitize_overflow=on, debug=on
        )


def _device_call(self, *args, **kwargs):
    """A jit helper called from a kernel: the launch patched `triton.language` already."""
    fn = self.rewrite()
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        raise _interp.InterpreterError(repr(e)) from e


def quicker() -> None:
    """Drop both costs; idempotent. Where this Triton's interpreter lacks what is replaced, the
    part that does not fit is left as it is (slower, never different)."""
    _set_overflow_checks(False)
    fn_cls = getattr(_interp, "InterpretedFunction", None)
    if hasattr(fn_cls, "rewrite") and hasattr(_interp, "InterpreterError"):
        fn_cls.__call__ = _device_call


@contextlib.contextmanager
def overflow_checked() -> Iterator[bool]:
    """The interpreter's int32 overflow checks (and every other device assert) on inside, then
    off; yields whether this Triton has them."""
    saved = _options()
    _set_overflow_checks(True)
    try:
        yield _has_checks()
    finally:
        if saved is not None:
            _interp.interpreter_builder.options = saved
