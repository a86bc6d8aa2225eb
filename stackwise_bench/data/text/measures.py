"""The language-model measures that need the text's size: bits per byte and word-level perplexity.

Loss per token depends on the tokenizer; these divide the same total (nats summed over the targets) by what the
targets encode instead: their UTF-8 bytes (``Tokenizer.token_bytes()[targets].sum()``, or a split's ``n_bytes``
when every id but the first is a target), or their words as WikiText counts them (a split's ``n_words``).
"""

from __future__ import annotations

import math


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    """``total_nats / (ln 2 * n_bytes)``: the only loss comparable across tokenizers."""
    if n_bytes <= 0:
        raise ValueError(f"bits per byte needs a positive byte count, not {n_bytes}")
    return total_nats / (math.log(2) * n_bytes)


def perplexity(total_nats: float, n_tokens: int) -> float:
    """``exp(total_nats / n_tokens)``: per token of this tokenizer."""
    return math.exp(total_nats / n_tokens)


def word_perplexity(total_nats: float, n_words: int) -> float:
    """``exp(total_nats / n_words)``: WikiText's word-level perplexity, whatever the tokenizer."""
    return math.exp(total_nats / n_words)
