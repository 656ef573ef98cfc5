"""OpenWebText as the papers prepare it, on a small local JSONL: every document followed by
<|endoftext|> in one stream, the last D documents as the validation split (MDLM's
`train[-100000:]`, the default for Skylion007/openwebtext), evaluation sequences cut across
document boundaries without BOS; the same through a (fake) `datasets` stream; user errors."""

import json
import sys
import types

import numpy as np
import pytest
import torch

from md4.cli import main
from md4.data import eval_chunks, load_corpus
from md4.data.prepare import HF_RECIPES, prepare
from md4.errors import UserError
from test_bpe import gpt2_merges, read_split, segments, tok  # noqa: F401  (fixtures)


def owt_documents(n: int) -> list[str]:
    """Web-page-like documents: a title line, paragraphs separated by blank lines, varied lengths."""
    rng = np.random.default_rng(1)
    words = "the city council said on Tuesday that it would vote again next week about 3.5 million dollars".split()
    docs = []
    for i in range(n):
        paragraphs = [" ".join(rng.choice(words, rng.integers(4, 30))).capitalize() + "."
                      for _ in range(rng.integers(1, 4))]
        docs.append(f"Story {i}: a headline\n\n" + "\n\n".join(paragraphs))
    return docs


def stream(docs, tok) -> list[int]:
    return [i for d in docs for i in tok.encode(d).tolist() + [tok.eot_id]]


@pytest.fixture
def owt_jsonl(tmp_path):
    docs = owt_documents(40)
    path = tmp_path / "owt.jsonl"
    path.write_text("".join(json.dumps({"text": d, "url": f"http://x/{i}"}) + "\n" for i, d in enumerate(docs)))
    return path, docs


def test_last_documents_are_the_validation_split(tmp_path, owt_jsonl, tok):
    """Small shards (50 tokens), so the cut between train and valid falls inside a shard and later
    shards move whole: train + valid is the whole stream, valid exactly the last 6 documents."""
    path, docs = owt_jsonl
    meta = prepare([path], tmp_path / "owt", valid_docs=6, workers=1, shard_tokens=50, progress=False)
    train, valid = read_split(tmp_path / "owt", "train"), read_split(tmp_path / "owt", "valid")
    assert valid.tolist() == stream(docs[-6:], tok) and train.tolist() == stream(docs[:-6], tok)
    splits = meta["splits"]
    assert (splits["train"]["documents"], splits["valid"]["documents"], meta["valid_docs"]) == (34, 6, 6)
    assert all(0 < s["tokens"] <= 50 for sp in ("train", "valid") for s in meta["splits"][sp]["shards"])
    assert sorted(p.name for p in (tmp_path / "owt").iterdir() if p.name.startswith(".")) == []  # no temporary left
    corpus = load_corpus(str(tmp_path / "owt"), min_length=17)  # read_meta checks every shard's size
    chunks = eval_chunks(corpus.valid, 16)  # sequences across document boundaries, no BOS
    assert torch.equal(chunks.flatten(), torch.tensor(valid[: len(chunks) * 16].astype(np.int64)))
    assert (chunks == tok.eot_id).any() and not (chunks[:, 0] == tok.eot_id).all()


def test_long_documents_in_pieces_and_processes_keep_one_separator_per_document(tmp_path, owt_jsonl, tok):
    path, docs = owt_jsonl
    prepare([path], tmp_path / "p", valid_docs=5, workers=2, piece_chars=60, shard_tokens=64, progress=False)
    assert segments(read_split(tmp_path / "p", "valid"), tok) == docs[-5:]
    assert segments(read_split(tmp_path / "p", "train"), tok) == docs[:-5]


def fake_datasets(monkeypatch, docs):
    calls = []

    def load_dataset(path, config, split, streaming):
        calls.append((path, config, split, streaming))
        return iter([{"text": d} for d in docs])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_openwebtext_from_the_hub_holds_out_its_last_100k_documents(tmp_path, owt_jsonl, tok, monkeypatch):
    _, docs = owt_jsonl
    calls = fake_datasets(monkeypatch, docs)
    assert HF_RECIPES["Skylion007/openwebtext"] == {"valid_docs": 100_000}
    with pytest.raises(UserError, match="40 documents, not more than the 100,000"):  # the recipe's default
        prepare([], tmp_path / "a", hf="Skylion007/openwebtext", workers=1, progress=False)
    assert not (tmp_path / "a" / "meta.json").exists()
    meta = prepare([], tmp_path / "b", hf="Skylion007/openwebtext", valid_docs=4, workers=1, progress=False)
    assert calls[-1] == ("Skylion007/openwebtext", None, "train", True) and meta["source"]["hf"]
    assert segments(read_split(tmp_path / "b", "valid"), tok) == docs[-4:]
    meta = prepare([], tmp_path / "c", hf="someone/else", workers=1, progress=False)  # no recipe: a fraction
    assert meta["valid_docs"] == 0 and meta["fractions"]["valid"] == 0.005


def test_valid_docs_on_the_command_line_and_its_errors(tmp_path, owt_jsonl, tok, capsys):
    path, docs = owt_jsonl
    argv = ["data", "prepare", str(path), "--out", str(tmp_path / "ok"), "--valid-docs", "3", "--workers", "1"]
    assert main(argv) == 0
    assert segments(read_split(tmp_path / "ok", "valid"), tok) == docs[-3:]
    cases = [(["--valid", "0.1", "--valid-docs", "3"], "not both"),
             (["--valid-docs", "3", "--test", "0.1"], "leave --test at 0"),
             (["--valid-docs", "40"], "not more than the 40"),
             (["--valid-docs", "-1"], "at least 0")]
    for k, (args, message) in enumerate(cases):
        assert main(["data", "prepare", str(path), "--out", str(tmp_path / f"o{k}"), "--workers", "1", *args]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (and the progress bar)
        assert len(errors) == 1 and errors[0].startswith("md4: error: ") and message in errors[0], (args, errors)
