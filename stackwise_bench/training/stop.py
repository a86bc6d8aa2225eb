"""Stopping a run cleanly: a signal asks the loop to save ``last.pt`` where it is, record, and stop.

:class:`StopSignal` is held by ``train.run`` for the whole run (training, validation, the test
phase and the final record), so a signal at any point ends in a saved, resumable run:

* **SIGINT, SIGTERM, SIGUSR2** ask the loop to save after the current step and stop; the run
  records ``interrupted`` and the process exits 128 + the signal (130, 143). A second Ctrl-C aborts.
* **Chained handlers.** Under submitit, SIGUSR2 means "preempted or out of time": submitit's own
  handler requeues the job and exits. Ours runs first (save ``last.pt`` at the current step and
  record), then :meth:`chain` calls submitit's, and the requeued job continues mid-epoch, bit for
  bit. submitit deliberately ignores SIGTERM (``scancel`` and preemption both send it, and only
  SIGUSR2 says which); there our handler saves ``last.pt`` now and training goes on.
* Other reasons to stop (the study's launcher stopped or died, the folder's lease was lost) come
  from :mod:`stackwise_bench.runs.stopping` and read like a signal.
"""

from __future__ import annotations

import logging
import signal
import threading

from stackwise_bench.runs import stopping

log = logging.getLogger(__name__)

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR2") if hasattr(signal, name))


def _is_chained(handler) -> bool:
    """A Python handler someone installed before us (submitit's), as opposed to a default or ignore."""
    return callable(handler) and handler is not signal.default_int_handler


class StopSignal:
    """Signals ask the loop to stop after the current step; :attr:`requested` says why (or None)."""

    def __init__(self):
        self.signal: str | None = None  # the signal that asked to stop
        self.save_now = False  # a chained SIGTERM: save last.pt at this step and carry on
        self._old: dict = {}

    @property
    def requested(self) -> str | None:
        """Why the run should stop: a signal's name, or a stop request's reason; None to carry on."""
        return self.signal or stopping.requested()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if signum == signal.SIGTERM and _is_chained(self._old.get(signum)):
            self.save_now = True
            log.warning("SIGTERM received: saving last.pt at this step (the scheduler decides whether to stop)")
            self._old[signum](signum, frame)
            return
        if self.signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = self.signal or name
        log.warning("%s received: saving last.pt after this step (Ctrl-C again to abort now)", name)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        return False

    def chain(self) -> None:
        """After the run has saved and recorded: hand the signal to the handler installed before ours (submitit's)."""
        if self.signal is None:
            return
        signum = signal.Signals[self.signal]
        handler = self._old.get(signum)
        if signum != signal.SIGTERM and _is_chained(handler):
            log.info("handing %s on to the handler installed before this run (a scheduler requeues here)", self.signal)
            handler(signum, None)
