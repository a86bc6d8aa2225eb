"""A small synthetic task in GLUE's SST-2 layout, for the offline quick studies (``scripts/bert_depth_time.sh``).

It is not GLUE: every sentence is drawn from a fixed seed out of word lists, and its label says whether it holds more
words of the "positive" list than of the "negative" one (ties never occur: the counts are drawn unequal). The folder
it writes is ``<root>/SST-2/{train,dev}.tsv`` (header ``sentence``/``label``, GLUE's own), so ``dataset=glue
dataset.task=sst2 dataset.root=<root>`` reads it like the real one, and ``<root>/SYNTHETIC.md`` says what it is.

    python -m stackwise_bench.data.text.glue_synthetic <root> [n_train] [n_dev]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

POSITIVE = ("fair", "sweet", "gentle", "noble", "love", "joy", "kind", "merry", "true", "grace", "honest", "bright")
NEGATIVE = ("foul", "bitter", "cruel", "base", "hate", "grief", "vile", "sad", "false", "shame", "wicked", "dark")
NEUTRAL = ("the", "lord", "my", "and", "a", "of", "king", "to", "thy", "is", "night", "day", "he", "her", "in", "it")


def synthetic_sentence(rng: np.random.Generator) -> tuple[str, int]:
    """A sentence and its label: 1 when it holds more positive than negative words."""
    pos, neg = rng.choice(4, size=2, replace=False)  # unequal counts: the label is always defined
    words = list(rng.choice(POSITIVE, pos)) + list(rng.choice(NEGATIVE, neg))
    words += list(rng.choice(NEUTRAL, int(rng.integers(3, 9))))
    return " ".join(rng.permutation(words)), int(pos > neg)


def write_synthetic_sst2(root: str | Path, n_train: int = 2000, n_dev: int = 400, seed: int = 0) -> Path:
    """Write the synthetic task under ``root`` (created; existing files are replaced) and return ``root``."""
    root = Path(root)
    folder = root / "SST-2"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = [synthetic_sentence(rng) for _ in range(n)]
        lines = ["sentence\tlabel", *(f"{text}\t{label}" for text, label in rows)]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "SYNTHETIC.md").write_text(
        f"Synthetic data in GLUE's SST-2 layout (stackwise_bench.data.text.glue_synthetic, seed {seed}): "
        "label 1 = more positive than negative words. Not GLUE.\n"
    )
    return root


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args:
        sys.exit("usage: python -m stackwise_bench.data.text.glue_synthetic ROOT [N_TRAIN] [N_DEV]")
    print(write_synthetic_sst2(args[0], *(int(a) for a in args[1:3])))
