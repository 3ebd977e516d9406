"""Cheap re-armable deadlines for the proxy's hot paths.

Owns: :class:`Deadline`, a timeout that is pushed back by moving a number instead of
cancelling and rescheduling a loop timer. Keep-alive connections and pooled upstream
connections restart their idle timeout on every request; with a plain ``call_later`` that is
one timer allocation and one heap insertion per request. Here the loop timer is armed once and,
when it fires early (the deadline moved), re-arms itself for the rest.
Must not: know what expires; it calls the function it was given.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Deadline:
    """``start()`` (re)starts the countdown of ``timeout`` seconds, ``stop()`` stops it;
    ``fire`` runs once the countdown reaches zero without a later ``start``/``stop``."""

    __slots__ = ("_at", "_fire", "_handle", "_loop", "timeout")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float,
                 fire: Callable[[], object]) -> None:
        self._loop = loop
        self.timeout = timeout
        self._fire = fire
        self._at: float | None = None
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        at = self._loop.time() + self.timeout
        self._at = at
        if self._handle is None:
            self._handle = self._loop.call_at(at, self._check)

    def stop(self) -> None:
        self._at = None        # the armed timer finds nothing to do and lapses

    def cancel(self) -> None:
        self._at = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    @property
    def running(self) -> bool:
        return self._at is not None

    def _check(self) -> None:
        self._handle = None
        at = self._at
        if at is None:
            return
        if self._loop.time() + 0.0005 < at:
            self._handle = self._loop.call_at(at, self._check)
            return
        self._at = None
        self._fire()
