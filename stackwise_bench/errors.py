"""The one exception type for bad input, and the part of any error a one-sentence message can quote."""


class ConfigError(ValueError):
    """Bad input, reported before training starts.

    The message is one sentence naming the config key, what was wrong and what
    to do, e.g. ``lora.rank=-1 must be a non-negative integer (0 = full fine-tuning); use e.g. lora.rank=8.``
    """

    reason = "config"  # the run record's error.reason and the sweep's failure table


def short_error(e: BaseException, limit: int = 160) -> str:
    """``Type: message`` on one line, cut at ``limit`` characters: the part of an error a sentence can quote."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
