"""Tests for GPT-2 BPE corpora: the tokenizer (local merges file), `md4 data prepare` (shards, end-of-text
separators, held-out split, processes), memory-mapped reading, training on a prepared folder, user errors."""

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from md4.cli import main
from md4.data import load_corpus, random_crops
from md4.data.prepare import PHI, prepare, split_of
from md4.data.tokens import TokenShards
from md4.errors import UserError

pytest.importorskip("tiktoken", reason="the GPT-2 tokenizer needs tiktoken (pip install tiktoken)")

REPO = Path(__file__).resolve().parents[1]
MERGES = [REPO / ".." / d / "shared" / "data" / "tokenizers" / "gpt2.tiktoken" for d in ("", "..")]


@pytest.fixture(scope="module", autouse=True)
def gpt2_merges():
    """The local GPT-2 merges (../shared/data/tokenizers/gpt2.tiktoken); these machines reach no download server."""
    found = next((p.resolve() for p in MERGES if p.is_file()), None)
    if found is None:
        pytest.skip("../shared/data/tokenizers/gpt2.tiktoken is absent (and tiktoken cannot download the merges here)")
    mp = pytest.MonkeyPatch()
    mp.setenv("MD4_GPT2_TIKTOKEN", str(found))
    yield found
    mp.undo()


@pytest.fixture(scope="module")
def tok():
    from md4.data.bpe import GPT2Tokenizer

    return GPT2Tokenizer()


def documents(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    words = "the king said unto his lord that we shall go to London tomorrow 1599 ¿qué? naïve".split()
    return [f"Document {i}: " + " ".join(rng.choice(words, rng.integers(5, 40))) + ("\n" if i % 3 else "")
            for i in range(n)]


def read_split(folder: Path, split: str) -> np.ndarray:
    meta = json.loads((folder / "meta.json").read_text())
    shards = meta["splits"][split]["shards"]
    return np.concatenate([np.fromfile(folder / s["file"], dtype="<u2") for s in shards] or [np.zeros(0, "<u2")])


def segments(ids: np.ndarray, tok) -> list[str]:
    """The texts between end-of-text tokens (a split always ends with one)."""
    assert len(ids) == 0 or ids[-1] == tok.eot_id
    parts = np.split(ids, np.flatnonzero(ids == tok.eot_id) + 1)[:-1]  # each ends with its EOT
    return [tok.decode(part[:-1]) for part in parts]


# ---- tokenizer ---------------------------------------------------------------------------------------


def test_gpt2_known_ids_and_round_trip(tok):
    assert (tok.vocab_size, tok.mask_id, tok.eot_id) == (50257, 50257, 50256)
    assert tok.encode("Hello world").tolist() == [15496, 995]  # GPT-2's ids
    text = "Café, naïve — 3.14159!\n\n  Tabs\tand 'quotes' don't <|endoftext|> stay text. 日本語"
    ids = tok.encode(text)
    assert ids.dtype == np.uint16 and tok.decode(ids) == text
    assert tok.eot_id not in ids.tolist()  # a literal "<|endoftext|>" is ordinary text
    assert tok.decode(torch.tensor([15496, tok.mask_id, 995])) == "Hello▒ world"


def test_bad_merges_file_is_a_user_error(tmp_path):
    from md4.data.bpe import read_ranks

    bad = tmp_path / "gpt2.tiktoken"
    bad.write_text("not base64 at all here\n")
    with pytest.raises(UserError, match="not a tiktoken BPE file"):
        read_ranks(bad)
    bad.write_text("SGVsbG8= 0\n")
    with pytest.raises(UserError, match="GPT-2 merges"):
        read_ranks(bad)


def test_models_trained_on_bpe_decode_with_the_gpt2_tokenizer():
    from md4.build import TOKENIZERS

    assert TOKENIZERS["gpt2"]().decode([15496, 995]) == "Hello world"


# ---- prepare -----------------------------------------------------------------------------------------


def test_prepare_jsonl_documents_with_separators_and_held_out_split(tmp_path, tok):
    """Every document lands whole in exactly one split, followed by <|endoftext|>; piece i goes to valid
    exactly when frac((i + 1) phi) < 0.1; 2 processes write the same bytes as 1."""
    docs = documents(200)
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)))
    outs = {}
    for workers in (1, 2):
        outs[workers] = tmp_path / f"w{workers}"
        meta = prepare([src], outs[workers], valid=0.1, test=0.05, workers=workers, progress=False)
    got = {s: segments(read_split(outs[2], s), tok) for s in ("train", "valid", "test")}
    expect = {s: [d for i, d in enumerate(docs) if split_of(i, 0.1, 0.05) == s] for s in got}
    assert got == expect
    assert len(expect["valid"]) == sum(((i + 1) * PHI) % 1 < 0.1 for i in range(200)) >= 15
    assert len(expect["test"]) >= 5
    assert [meta["splits"][s]["documents"] for s in got] == [len(expect[s]) for s in got]
    assert sum(meta["splits"][s]["tokens"] for s in got) == sum(len(tok.encode(d)) + 1 for d in docs)
    for f in outs[1].iterdir():
        if f.suffix == ".bin":
            assert f.read_bytes() == (outs[2] / f.name).read_bytes(), f.name
    assert not list(outs[2].glob(".*"))  # no temporary files left


def test_prepare_long_text_in_pieces(tmp_path, tok):
    """A text file cut into ~300-character pieces: with no held-out split the train stream decodes to the
    file exactly, with one <|endoftext|> at the end; with one, every segment is a contiguous excerpt and
    together they hold every character once. Shards of 1,000 tokens."""
    text = "".join(d + "\n" for d in documents(300))
    src = tmp_path / "book.txt"
    src.write_text(text)
    meta = prepare([src], tmp_path / "all", valid=0, workers=2, piece_chars=300, shard_tokens=1000, progress=False)
    train = read_split(tmp_path / "all", "train")
    assert tok.decode(train[:-1]) == text and train[-1] == tok.eot_id and (train == tok.eot_id).sum() == 1
    assert len(meta["splits"]["train"]["shards"]) == -(-len(train) // 1000) > 1
    assert all(s["tokens"] == 1000 for s in meta["splits"]["train"]["shards"][:-1])

    prepare([src], tmp_path / "held", valid=0.2, workers=2, piece_chars=300, progress=False)
    segs = {s: segments(read_split(tmp_path / "held", s), tok) for s in ("train", "valid")}
    assert len(segs["valid"]) > 5 and all(seg in text for seg in segs["train"] + segs["valid"])
    assert sum(map(len, segs["train"] + segs["valid"])) == len(text)


def test_memory_mapped_windows_stay_inside_shards(tmp_path):
    a, b = np.arange(0, 50, dtype="<u2"), np.arange(1000, 1030, dtype="<u2")
    a.tofile(tmp_path / "a.bin")
    b.tofile(tmp_path / "b.bin")
    shards = TokenShards([tmp_path / "a.bin", tmp_path / "b.bin"], [50, 30])
    assert len(shards) == 80 and shards.windows(10).tolist() == [41, 21]
    windows = shards.crops(torch.tensor([0, 40, 41, 61]), 10)
    assert windows.dtype == torch.long
    assert windows.tolist() == [list(range(0, 10)), list(range(40, 50)), list(range(1000, 1010)),
                                list(range(1020, 1030))]
    full = random_crops(shards, 64, 10, torch.Generator().manual_seed(0))
    half = random_crops(shards, 64, 10, torch.Generator().manual_seed(0), rows=slice(32, 64))
    assert torch.equal(full[32:], half)  # a rank's rows of the same global batch
    assert ((full[:, 1:] - full[:, :-1]) == 1).all()  # consecutive tokens: no window crosses a shard end
    starts = set(full[:, 0].tolist())
    assert starts <= set(range(0, 41)) | set(range(1000, 1021)) and len(starts) > 30


def test_train_eval_sample_on_a_prepared_folder(tmp_path):
    """A prepared folder is a corpus: train a few steps, evaluate, sample, decode GPT-2 text."""
    import md4
    from md4.evaluate import evaluate_model
    from md4.config import load_config
    from md4.train import train

    src = tmp_path / "book.txt"
    src.write_text("".join(d + "\n" for d in documents(400)))
    folder = tmp_path / "prepared"
    prepare([src], folder, valid=0.1, workers=1, piece_chars=500, progress=False)
    corpus = load_corpus(str(folder), min_length=33)
    assert isinstance(corpus.train, TokenShards) and corpus.tokenizer.name == "gpt2"
    train(load_config("tiny", [f"data.corpus={folder}", "train.steps=3", "train.eval_every=3"]),
          tmp_path / "run", progress=False)
    m = md4.load(tmp_path / "run")
    assert m.tokenizer.name == "gpt2" and m.net.head.out_features == 50257
    r = evaluate_model(m, limit=4, progress=False)
    assert r["sequences"] == 4 and 10 < r["bits_per_token"] < 40  # near log2(50257) = 15.6 untrained
    texts = m.decode(m.sample(2, steps=4))
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)


# ---- errors ------------------------------------------------------------------------------------------


def test_prepare_user_errors(tmp_path, capsys):
    good = tmp_path / "a.jsonl"
    good.write_text(json.dumps({"text": "hello there"}) + "\n")
    assert main(["data", "prepare", str(good), "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    cases = [
        ([str(good), "--out", str(tmp_path / "out")], "already holds a prepared corpus"),
        ([str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o1")], "does not exist"),
        (["--out", str(tmp_path / "o2")], "No input files"),
        ([str(good), "--out", str(tmp_path / "o3"), "--valid", "0.7", "--test", "0.4"], "fractions"),
        ([str(good), "--out", str(tmp_path / "o4"), "--text-field", "body"], "no string field 'body'"),
        ([str(good), "--out", str(tmp_path / "o5"), "--tokenizer", "bert"], "Unknown tokenizer"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    cases.append(([str(bad), "--out", str(tmp_path / "o6"), "--workers", "2"], "Line 2 of"))
    for args, message in cases:
        assert main(["data", "prepare", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
    for out in ("o3", "o5"):
        assert not (tmp_path / out / "meta.json").exists()


def test_prepare_leaves_nothing_after_an_error(tmp_path, capsys, monkeypatch):
    """An error part-way (a bad line after 40 good ones, a full disk at meta.json) removes this call's shards and
    the folders it made; a folder that existed keeps what it had; --out naming a file is refused."""
    import md4.data.prepare

    bad = tmp_path / "bad.jsonl"
    bad.write_text((json.dumps({"text": "Some words to tokenize. " * 20}) + "\n") * 40 + "{not json\n")

    def prepare_fails(out, words: str) -> None:
        assert main(["data", "prepare", str(bad), "--out", str(out), "--workers", "1", "--shard-tokens", "100"]) == 2
        err = capsys.readouterr().err  # the progress bar, then one sentence
        assert words in err.splitlines()[-1] and err.count("md4: error: ") == 1 and "Traceback" not in err, err

    prepare_fails(tmp_path / "a" / "b" / "corpus", "Line 41 of")
    assert not (tmp_path / "a").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    prepare_fails(mine, "Line 41 of")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    (tmp_path / "file.txt").write_text("keep")
    prepare_fails(tmp_path / "file.txt", "existing file")
    assert (tmp_path / "file.txt").read_text() == "keep"

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    bad.write_text((json.dumps({"text": "Some words to tokenize. " * 20}) + "\n") * 40)
    monkeypatch.setattr(md4.data.prepare, "write_text_atomic", full_disk)
    prepare_fails(tmp_path / "c", "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "file.txt", "mine"]


def test_hf_dataset_without_datasets_is_a_user_error(tmp_path):
    try:
        import datasets  # noqa: F401
        pytest.skip("datasets is installed; the error path for a missing package cannot be checked")
    except ImportError:
        pass
    with pytest.raises(UserError, match="datasets"):
        prepare([], tmp_path / "owt", hf="Skylion007/openwebtext", progress=False)
