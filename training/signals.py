"""Clean stop on SIGINT/SIGTERM: the handler only sets a flag; the trainer finishes the current
step, writes ``last.pt`` and logs ``{"event": "end", "status": "stopped"}``."""

from __future__ import annotations

import signal
import threading


class StopFlag:
    def __init__(self):
        self._event = threading.Event()
        self.signal_name = None
        self._previous = {}

    def install(self) -> "StopFlag":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    def set(self) -> None:
        self._event.set()

    @property
    def stopped(self) -> bool:
        return self._event.is_set()
