"""A process-wide request to stop: how a job is asked to save and stop by something other than its own signals.

A sweep job's watchdog (:mod:`stackwise_bench.runs.launch`) sets it when its launcher asks the study to
stop or dies; the lease sets it when another process took the run folder over. The training loop's
:class:`~stackwise_bench.training.stop.StopSignal` reads it after every step, like a signal.
Joblib reuses worker processes between jobs, so each job clears it when it starts.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_reason: str | None = None


def request(reason: str, announce: bool = True) -> None:
    """Ask the running job to save ``last.pt`` after its current step and stop; ``reason`` says why.

    ``announce=False``: the requester says it itself (a lost lease: the job saves nothing, it ends in one sentence).
    """
    global _reason
    if _reason is None:
        if announce:
            log.warning("%s: saving last.pt after this step and stopping", reason)
        _reason = reason


def requested() -> str | None:
    """Why a stop was requested, or None."""
    return _reason


def clear() -> None:
    global _reason
    _reason = None
