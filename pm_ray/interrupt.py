"""Ctrl-C and SIGTERM of a run: stop Ray cleanly and exit 130 / 143, keeping the last committed task.

Every durable file is written atomically and state.json names the last committed task, so
stopping at any point loses at most the task in progress; the same command resumes from there.
What this module adds is a clean stop: Ray's driver installs a C++ SIGTERM handler that prints a
stack dump and aborts (exit -6, Ray processes left running), and Ray Train's own SIGINT handler
exits 1 without saying why. :func:`stop_on_signals` replaces both (after ``ray.init``).

The handler itself only records the signal (an exception raised from a handler while the main
thread is inside Ray's compiled code is not reliably delivered) and starts the abort of the Ray
Train controller when there is one; the worker loop, when it runs in this process, stops at its
next step (:func:`check`); the pipeline then raises :class:`Interrupted` and shuts Ray down.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A SIGINT/SIGTERM of the driver (a BaseException, like KeyboardInterrupt: ``except
    Exception`` in the stack does not swallow it). ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, message: str = "") -> None:
        self.signum = signum
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """The first signal received, and how to abort what runs elsewhere (the Train workers)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._abort: Callable[[], None] | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    def trigger(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
            self._start_abort()

    def on_stop(self, abort: Callable[[], None]) -> None:
        """Run ``abort`` (in a thread) once a signal arrives, or now if one already has."""
        self._abort = abort
        if self.signum is not None:
            self._start_abort()

    def _start_abort(self) -> None:
        if self._abort is not None:
            threading.Thread(target=self._abort, name="pm-ray-abort", daemon=True).start()


_current: StopRequest | None = None


def check() -> None:
    """Raise :class:`Interrupted` if this process was asked to stop (the in-process worker loop
    calls it at every step; in a Ray worker process it never fires)."""
    if _current is not None and _current.signum is not None:
        raise Interrupted(_current.signum)


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """SIGINT/SIGTERM recorded in the yielded :class:`StopRequest` (later ones are ignored while
    the run stops; SIGKILL still ends it). Only in the main thread: a Tune trial's thread cannot
    set handlers, and Tune stops its trials itself."""
    global _current
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum: int, frame: object) -> None:
        del frame
        request.trigger(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    _current = request
    try:
        yield request
    finally:
        _current = None
        for s, h in previous.items():
            signal.signal(s, h)
