"""dataset=wikitext103: the raw files from a local folder, refused in one sentence when they are not there, and
WikiText's word-level perplexity end to end (tiny files in the real format, one epoch of gpt_micro)."""

from __future__ import annotations

import math

import pytest

from stackwise_bench.data.text.corpora import count_words, load_wikitext103
from stackwise_bench.data.text.dataset import load_text_dataset
from stackwise_bench.errors import ConfigError
from stackwise_bench.knobs import check_config
from stackwise_bench.train import run

from conftest import compose, read_summary

HEADINGS = ["Valkyria Chronicles III", "Gameplay", "Plot", "Development", "Reception"]
WORDS = "the game was released in Japan on 27 January 2011 , and @-@ its story follows a squad of soldiers".split()


def wiki_raw(n_articles: int, seed: int) -> str:
    """Text as ``wiki.*.raw`` has it: a space-led line per paragraph, `` = Title = `` headings, `` `` blank lines."""
    lines = []
    for a in range(n_articles):
        lines += [" ", f" = {HEADINGS[(a + seed) % len(HEADINGS)]} = ", " "]
        for p in range(3):
            words = [WORDS[(a * 7 + p * 3 + seed + i) % len(WORDS)] for i in range(12 + (a + p) % 9)]
            lines += [" " + " ".join(words) + " . ", " "]
        lines += [" = = Legacy = = ", " "]
    return "\n".join(lines) + "\n"


@pytest.fixture
def wikitext(tmp_path):
    folder = tmp_path / "wikitext-103-raw"
    folder.mkdir()
    for name, (n, seed) in {"wiki.train.raw": (40, 0), "wiki.valid.raw": (4, 1), "wiki.test.raw": (5, 2)}.items():
        (folder / name).write_text(wiki_raw(n, seed), encoding="utf-8")
    return folder


def test_missing_folder_or_file_is_refused_in_one_sentence(tmp_path, wikitext):
    with pytest.raises(ConfigError) as missing:
        load_text_dataset("wikitext103", root=str(tmp_path / "nowhere"))
    message = str(missing.value)
    assert message.startswith(f"dataset.root={tmp_path / 'nowhere'} does not exist") and message.count(". ") == 0
    assert "point dataset.root at the folder holding wiki.train.raw, wiki.valid.raw and wiki.test.raw" in message
    (wikitext / "wiki.test.raw").unlink()
    with pytest.raises(ConfigError, match=r"dataset\.root=.* has no wiki\.test\.raw: WikiText-103 is not downloaded"):
        load_wikitext103(wikitext)
    with pytest.raises(ConfigError, match=r"^dataset\.root=\?\?\? must be set"):
        check_config(compose(["model=gpt2_small", "dataset=wikitext103"], tiny=False))


def test_the_parent_folder_is_accepted_and_splits_are_the_published_files(wikitext):
    corpus = load_wikitext103(wikitext.parent)  # the folder the zip unpacks into, or the one above it
    assert {s: [d.name for d in docs] for s, docs in corpus.splits.items()} == {
        "train": ["wiki.train.raw"],
        "val": ["wiki.valid.raw"],
        "test": ["wiki.test.raw"],
    }
    assert corpus.text("test") == (wikitext / "wiki.test.raw").read_text(encoding="utf-8")


@pytest.mark.slow
def test_word_perplexity_is_total_nats_over_wikitexts_words(tmp_path, wikitext):
    """One epoch of gpt_micro on bytes; the test phase's word_ppl is exp(test nats / words), with the words counted
    here from the file as WikiText counts them (whitespace-separated words plus one <eos> per line)."""
    cfg = compose(
        [
            "model=gpt_micro",
            "dataset=wikitext103",
            f"dataset.root={wikitext}",
            "dataset.tokenizer=byte",
            "dataset.seq_len=16",
            "dataset.steps_per_epoch=3",
            "dataset.val_tokens=512",
            "dataset.test_tokens=null",
            f"dataset.cache_dir={tmp_path / 'cache'}",
            "trainer.max_epochs=1",
            "trainer.batch_size=4",
            "trainer.threads=1",
        ]
    )
    summary = run(cfg, tmp_path / "run")
    assert summary["status"] == "completed", summary.get("error")
    test = read_summary(tmp_path / "run")["test"]
    text = (wikitext / "wiki.test.raw").read_text(encoding="utf-8")
    words = len(text.split()) + text.count("\n")  # every line ends with "\n" here: one <eos> each
    assert words == count_words(text)
    assert test["tokens"] == len(text.encode()) - 1  # every byte but the first is a target: the whole split
    assert test["word_ppl"] == pytest.approx(math.exp(test["nats"] / words), rel=1e-12)
    assert test["ppl"] == pytest.approx(math.exp(test["nats"] / test["tokens"]), rel=1e-12)
    assert test["word_ppl"] > test["ppl"]  # a word spans several bytes: more nats per word than per byte
    assert summary["data"]["tokens"]["splits"]["test"]["words"] == words
