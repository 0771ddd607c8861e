"""SIGINT / SIGTERM for long commands: raise :class:`Interrupted` in the main thread, except inside
:func:`critical` sections (checkpoint and metrics writes), where the signal is held until the section ends.

The run loop catches :class:`Interrupted`, puts the last complete generation on disk and re-raises; the CLI
prints how to resume and exits ``128 + signal`` (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import signal
import threading

_state = threading.local()


class Interrupted(BaseException):
    """A SIGINT or SIGTERM arrived (a BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _depth() -> int:
    return getattr(_state, "depth", 0)


def _handler(signum, frame) -> None:
    if _depth() > 0:
        _state.pending = signum
        return
    raise Interrupted(signum)


_active = threading.Event()


@contextlib.contextmanager
def handle_signals():
    """Install the handlers for the duration of a command (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, _handler)
    _active.set()
    try:
        yield
    finally:
        _active.clear()
        for s, handler in previous.items():
            signal.signal(s, handler)


def reassert() -> None:
    """Put the handlers back if a library replaced them (``ray.init`` installs its own SIGTERM handler,
    which would exit without a checkpoint); a no-op outside :func:`handle_signals`."""
    if _active.is_set() and threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(s) is not _handler:
                signal.signal(s, _handler)


@contextlib.contextmanager
def critical():
    """Hold SIGINT/SIGTERM until the block ends (a write that must not be cut by the handler)."""
    _state.depth = _depth() + 1
    try:
        yield
    finally:
        _state.depth -= 1
        pending = getattr(_state, "pending", None)
        if _state.depth == 0 and pending is not None:
            _state.pending = None
            raise Interrupted(pending)
