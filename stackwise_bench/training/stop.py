"""Stopping a run cleanly: a signal asks the training loop to save ``last.pt`` after the current step."""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)


class StopSignal:
    """SIGINT/SIGTERM ask the loop to stop after the current step (a second SIGINT aborts at once)."""

    def __init__(self):
        self.requested: str | None = None
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("%s received: saving last.pt after this step (Ctrl-C again to abort now)", self.requested)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        return False
