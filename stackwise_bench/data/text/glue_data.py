"""``dataset=glue``: one GLUE task from a local copy, for BERT fine-tuning (``training/glue_task.py``).

:func:`load_glue_dataset` reads the task's files (:func:`~stackwise_bench.data.text.glue.glue_splits`: dev is the
test split, a seeded slice of train the validation split) and loads the tokenizer; it tokenizes nothing, so a
config the assembly refuses (a model that cannot hold the ids, a decoder) costs no tokenizing. :meth:`GlueData.loaders`
encodes the rows as BERT inputs once per run.

The tokenizer must be the one the encoder was pretrained with: ``byte`` or ``gpt2`` (a BPE is trained on a corpus,
which a GLUE task is not: refused, with the fix).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from stackwise_bench.data.text.glue import TASKS, GlueSplits, glue_spec, glue_splits
from stackwise_bench.data.text.glue_batches import GlueBatches, encode_examples, glue_test_batches
from stackwise_bench.data.text.special_tokens import SpecialTokens, special_tokens_for
from stackwise_bench.data.text.tokenizers import Tokenizer, load_tokenizer
from stackwise_bench.errors import ConfigError

GLUE_TOKENIZERS = ("byte", "gpt2")


@dataclass
class GlueData:
    """A GLUE task's rows and the tokenizer; ``kind`` tells the assembly it is GLUE."""

    task: str
    rows: GlueSplits = field(repr=False)
    tokenizer: Tokenizer = field(repr=False)
    seq_len: int
    kind: str = "glue"

    @property
    def name(self) -> str:
        return f"glue_{self.task}"

    @property
    def special(self) -> SpecialTokens:
        return special_tokens_for(self.tokenizer)

    @property
    def num_labels(self) -> int:
        return TASKS[self.task].num_labels

    num_classes = num_labels

    @property
    def classes(self) -> tuple:
        return TASKS[self.task].labels

    @property
    def split(self) -> dict:
        """``split.json``: the files and their sha256, the validation rows taken from train, the test parts (dev),
        the tokenizer; ``sha256`` over all of it (a resume on other data is refused by it)."""
        record = {**self.rows.record, "tokenizer": self.tokenizer.describe(), "special_tokens": self.special.describe()}
        record["sha256"] = hashlib.sha256(f"{self.rows.record['sha256']} {self.tokenizer.sha256}".encode()).hexdigest()
        return record

    @property
    def notes(self) -> dict:
        """summary.json's ``data`` section beside the name: the task, row counts, tokenizer and sequence length."""
        counts = {"train": len(self.rows.train), "val": len(self.rows.val)}
        counts |= {f"test_{name}": len(rows) for name, rows in self.rows.tests.items()}
        return {"glue_task": self.task, "rows": counts, "tokenizer": self.tokenizer.describe(), "seq_len": self.seq_len}

    def loaders(self, batch_size: int, eval_batch_size: int, seed: int, device) -> tuple:
        """``(train, val, test)``: training batches shuffled from ``(seed, epoch)``, the validation slice and the test
        parts (MNLI's matched and mismatched, tagged) in file order."""
        special, tok = self.special, self.tokenizer
        train = GlueBatches(encode_examples(self.rows.train, tok, special, self.seq_len), batch_size, seed, device)
        val = GlueBatches(encode_examples(self.rows.val, tok, special, self.seq_len), eval_batch_size, seed, device)
        test = glue_test_batches(self.rows.tests, tok, special, self.seq_len, eval_batch_size, device)
        return train, val, test


def load_glue_dataset(
    task: str,
    root: str | None = None,
    tokenizer: str = "byte",
    tokenizer_files: str | None = None,
    seq_len: int = 128,
    val_fraction: float = 0.1,
    split_seed: int = 0,
) -> GlueData:
    """GLUE task ``task`` under ``root`` (the original release's ``<root>/<Task>/*.tsv``, or a ``save_to_disk``
    folder), split into train / a seeded validation slice of train / dev as the test split.

    Raises:
        ConfigError: An unknown task (the tasks listed), no root, a missing task folder or file (the files named),
            columns that are not the task's, or a tokenizer that a GLUE task cannot have.
    """
    glue_spec(task)  # an unknown task is refused first, naming the tasks
    if root is None:
        raise ConfigError(
            f"dataset.root=null: dataset=glue reads a local copy of GLUE; set dataset.root=DIR, the folder that holds "
            f"{TASKS[task].folder}/ (download GLUE elsewhere)."
        )
    if tokenizer not in GLUE_TOKENIZERS:
        raise ConfigError(
            f"dataset.tokenizer={tokenizer} is trained on a corpus, which a GLUE task is not; use "
            "dataset.tokenizer=byte or gpt2 (the one the encoder was pretrained with)."
        )
    rows = glue_splits(root, task, val_fraction, split_seed)
    return GlueData(task, rows, load_tokenizer(tokenizer, files=tokenizer_files), seq_len)
