"""A value worked out in a daemon thread of its own and read without waiting: what the
health endpoint and the Slurm ping share. The thread starts on the first read, in the
process that reads (gunicorn forks its workers after import, and threads do not survive
a fork)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Background(Generic[T]):
    """`every_s` is the pause between rounds, or a function of the latest value giving it
    (a watcher that looks more often while something is wrong); wake() ends a pause early."""

    def __init__(self, work: Callable[[], T], every_s: float | Callable[[T], float], name: str) -> None:
        self.work, self.every_s, self.name = work, every_s, name
        self.value: T | None = None
        self.at = 0.0
        self.ready = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._started = False

    def _loop(self) -> None:
        while True:
            value = self.work()
            with self._lock:
                self.value, self.at = value, time.monotonic()
            self.ready.set()
            pause = self.every_s(value) if callable(self.every_s) else self.every_s
            self._wake.wait(pause)
            self._wake.clear()

    def wake(self) -> None:
        """Start the next round now (if a round runs, right after it)."""
        self._wake.set()

    def start(self) -> None:
        with self._lock:
            if not self._started:
                threading.Thread(target=self._loop, daemon=True, name=self.name).start()
                self._started = True

    def set(self, value: T, at: float | None = None) -> None:
        """Record a value without the thread (tests set the value and its age)."""
        with self._lock:
            self._started = True
            self.value, self.at = value, time.monotonic() if at is None else at
        self.ready.set()

    def latest(self, wait_s: float = 5.0) -> tuple[T | None, float]:
        """(the latest value or None when none yet after `wait_s`, its age in seconds)."""
        self.start()
        self.ready.wait(wait_s)
        with self._lock:
            return self.value, time.monotonic() - self.at
