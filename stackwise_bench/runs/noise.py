"""Known third-party noise, silenced narrowly: each filter names the logger that emits it and the message.

Never a global filter: every other line of these libraries still prints. :func:`quiet` runs when the entrypoints'
job protocol is imported (:mod:`stackwise_bench.runs.job`), before torch, peft or torchao are.
"""

from __future__ import annotations

import logging
import re

# torch >= 2.10 logs a deprecation each time torchao registers one of its enums as a pytree constant at import
# (torchao comes in through peft -> transformers, and with precision=fp8): two lines on every run with an adapter,
# before any sentence of ours. Nothing to act on here: torchao's to change.
PYTREE_ENUMS = (
    "torch.utils._pytree",
    re.compile(r"is an Enum subclass and is now natively supported by torch\.compile as an opaque value type"),
)
KNOWN = (PYTREE_ENUMS,)


class DropMessage(logging.Filter):
    """Drops the records whose message matches ``pattern`` (installed on the one logger that emits them)."""

    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet() -> None:
    """Install the filters of :data:`KNOWN` (once: a reused process imports this again)."""
    for name, pattern in KNOWN:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessage) and f.pattern == pattern for f in logger.filters):
            logger.addFilter(DropMessage(pattern))
