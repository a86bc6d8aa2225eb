"""BERT's special tokens over the project's tokenizers, which have none: ids reserved past the tokenizer's vocabulary.

The byte (256 ids), gpt2 (50,257) and bpe tokenizers map every id to text, so BERT's ``[PAD]``, ``[CLS]``,
``[SEP]`` and ``[MASK]`` take the four ids right after them: ``pad = V``, ``cls = V + 1``, ``sep = V + 2``,
``mask = V + 3`` for a tokenizer of ``V`` ids, and the model's vocabulary is ``V + 4``. No text ever encodes to
them, so a masked or padded position can never be confused with a real token, and the tokenizer's own ids (and its
token cache) stay as they are. The random replacement of masked-LM pretraining draws from ``[0, V)`` only.
"""

from __future__ import annotations

from dataclasses import dataclass

N_SPECIAL = 4


@dataclass(frozen=True)
class SpecialTokens:
    """The reserved ids of a tokenizer of ``text_vocab`` ids; ``vocab_size`` is what the model must hold."""

    text_vocab: int

    @property
    def pad(self) -> int:
        return self.text_vocab

    @property
    def cls(self) -> int:
        return self.text_vocab + 1

    @property
    def sep(self) -> int:
        return self.text_vocab + 2

    @property
    def mask(self) -> int:
        return self.text_vocab + 3

    @property
    def vocab_size(self) -> int:
        return self.text_vocab + N_SPECIAL

    @property
    def ids(self) -> tuple[int, ...]:
        """Every special id (none is ever masked or a prediction target)."""
        return (self.pad, self.cls, self.sep, self.mask)

    def describe(self) -> dict:
        """For summary.json and split.json: which id stands for which token."""
        return {"pad": self.pad, "cls": self.cls, "sep": self.sep, "mask": self.mask, "vocab_size": self.vocab_size}


def special_tokens_for(tokenizer) -> SpecialTokens:
    """The reserved ids past ``tokenizer.vocab_size`` (any :class:`~stackwise_bench.data.text.tokenizers.Tokenizer`)."""
    return SpecialTokens(int(tokenizer.vocab_size))
