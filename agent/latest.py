"""A thread that works on the newest value posted to it, dropping the ones it had no time for.

Why: the sampler's tick must never wait behind span work. Finalising phase time (PhaseAccountant.
advance) costs time in proportion to the spans that arrived, so under a span flood it can take
longer than a tick; run on the tick thread it made every tick late. Posted here instead, the tick
returns at once, and when advancing falls behind, the ticks in between fold into one advance to the
newest time, which loses nothing (advance(t) finalises everything settled before t).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
_NOTHING = object()


class LatestValueWorker(Generic[T]):
    def __init__(self, name: str, work: Callable[[T], None]):
        self._work = work
        self._condition = threading.Condition()
        self._value: object = _NOTHING
        self._busy = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "LatestValueWorker[T]":
        self._thread.start()
        return self

    def post(self, value: T) -> None:
        """Never blocks for longer than it takes to store the value."""
        with self._condition:
            self._value = value
            self._condition.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """True once every value posted so far has been worked on (for tests and shutdown)."""
        with self._condition:
            return self._condition.wait_for(lambda: self._value is _NOTHING and not self._busy, timeout)

    def stop(self, timeout: float = 5.0) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._stopping or self._value is not _NOTHING)
                if self._stopping:
                    return
                value, self._value, self._busy = self._value, _NOTHING, True
            try:
                self._work(value)  # type: ignore[arg-type]
            except Exception:  # one bad round must not end the thread for good
                log.exception("%s failed", self._thread.name)
            finally:
                with self._condition:
                    self._busy = False
                    self._condition.notify_all()
