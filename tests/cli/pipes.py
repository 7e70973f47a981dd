"""sys.stdout after the reader of a pipe went away (`qkv ... | head -1`), for the CLI tests.

Patched in the test body (`close_stdout(monkeypatch)`), not in a fixture: pytest's capture
puts its own sys.stdout back at the start of each test phase."""

from __future__ import annotations


class ClosedStdout:
    """Every write and flush raises EPIPE, as a real closed pipe does."""

    def write(self, s):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")

    def isatty(self):
        return False

    def fileno(self):
        raise OSError("no file descriptor")


def close_stdout(monkeypatch) -> None:
    monkeypatch.setattr("sys.stdout", ClosedStdout())
