"""The one exception type for bad input."""


class ConfigError(ValueError):
    """Bad input, reported before training starts.

    The message is one sentence naming the config key, what was wrong and what
    to do, e.g. ``lora.rank=-1 must be a non-negative integer (0 = full fine-tuning); use e.g. lora.rank=8.``
    """

    reason = "config"  # the run record's error.reason and the sweep's failure table
