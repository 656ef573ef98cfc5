"""Records (md4.data.records): reading, vocabulary, rows with EOS and padding, the structural
restriction against enumeration, the per-record summary, and train / eval / sample via the CLI."""

import gzip
import itertools
import json
import random

import numpy as np
import pytest
import torch

from md4.build import build, model_metadata
from md4.checkpoint import read_json
from md4.cli import main
from md4.config import load_config
from md4.data import load_corpus
from md4.data.records import EOS, PAD, RecordTokenizer, read_records, vocabulary
from md4.errors import UserError
from md4.evaluate import record_summary
from md4.pretrained import read_model_config
from md4.restrict import NEG, restrict_logits
from test_cli import user_error  # one sentence on stderr, exit status 2


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def smiles_like(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("CNO()=c1") for _ in range(rng.randint(3, 14))) for _ in range(n)]


def test_readers(tmp_path):
    (tmp_path / "a.fasta").write_text(">p1 first\nMKV\nLLA\n>p2\nGG\n\n>p3\nW\n")
    assert read_records(tmp_path / "a.fasta") == ["MKVLLA", "GG", "W"]
    (tmp_path / "a.smi").write_text("CCO ethanol\nc1ccccc1\tbenzene\n")
    assert read_records(tmp_path / "a.smi") == ["CCO", "c1ccccc1"]
    (tmp_path / "a.jsonl").write_text(json.dumps({"seq": "AB", "x": 1}) + "\n" + json.dumps({"seq": "C"}) + "\n")
    assert read_records(tmp_path / "a.jsonl", "seq") == ["AB", "C"]
    (tmp_path / "a.csv").write_text('name,smiles\n"x, y",CC\nz,N\n')
    assert read_records(tmp_path / "a.csv", "smiles") == ["CC", "N"]
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("hello world\nab\n")
    assert read_records(tmp_path / "b.txt.gz") == ["hello world", "ab"]


def test_vocabulary_and_round_trip():
    records = ["CC(=O)O", "c1ccccc1", "N"]
    symbols = vocabulary(records)
    assert symbols == sorted(set("CC(=O)Oc1ccccc1N"))
    tok = RecordTokenizer(symbols)
    ids, lengths = tok.encode_many(records)
    assert lengths.tolist() == [7, 8, 1] and ids.dtype == np.uint8
    assert ids[:7].tolist() == (tok.encode("CC(=O)O")).tolist()
    rows = tok.rows(ids, lengths, 10)
    assert rows[2].tolist() == [tok.ids["N"], EOS] + [PAD] * 8
    assert rows[1, 8] == EOS and rows[1, 9] == PAD
    assert [tok.decode(r) for r in rows] == records
    words = RecordTokenizer(vocabulary(["the cat", "a cat sat"], "words"), " ")
    assert words.symbols == ["a", "cat", "sat", "the"]
    w_ids, w_len = words.encode_many(["a cat sat"])
    assert w_len.tolist() == [3] and words.decode(words.rows(w_ids, w_len, 5)[0]) == "a cat sat"


def test_closed_and_open_patterns():
    tok = RecordTokenizer(list("CNO"), length=6)
    known, mask = tok.condition("C_O")
    m = tok.mask_id
    assert mask.tolist() == [True, False, True, True, True, True]
    assert known[mask].tolist() == [tok.ids["C"], tok.ids["O"], EOS, PAD, PAD]
    known, mask = tok.condition("CN", 6)  # a prompt: the rest, end included, is generated
    assert mask.tolist() == [True, True, False, False, False, False]
    assert m == 5
    with pytest.raises(UserError, match="not in this vocabulary"):
        tok.condition("CXN")


def valid_rows(num_symbols: int, n: int) -> list[tuple[int, ...]]:
    """Every row symbols* EOS PAD* of length n (ids: 0 PAD, 1 EOS, 2.. symbols)."""
    rows = []
    for length in range(n):
        for body in itertools.product(range(2, 2 + num_symbols), repeat=length):
            rows.append(body + (EOS,) + (PAD,) * (n - length - 1))
    return rows


def check_allowed_by_enumeration(tok, rows: list[tuple[int, ...]]) -> None:
    """At every masked position of every partly masked valid row, `tok.allowed` allows exactly
    the values that some valid row agreeing with the unmasked positions has there (rows: all
    valid rows; also used by test_tables)."""
    n, m = len(rows[0]), tok.mask_id
    for row in rows:
        for keep in itertools.product([False, True], repeat=n):
            x = torch.tensor([v if k else m for v, k in zip(row, keep)])
            consistent = [r for r in rows if all(not k or r[i] == row[i] for i, k in enumerate(keep))]
            allowed = tok.allowed(x[None])
            allowed = allowed[0] if allowed.ndim == 3 else allowed
            for i in range(n):
                if not keep[i]:
                    assert set(allowed[i].nonzero().flatten().tolist()) == {r[i] for r in consistent}, (row, keep, i)


def test_allowed_matches_enumeration():
    check_allowed_by_enumeration(RecordTokenizer(list("ab")), valid_rows(2, 5))


def test_restrict_logits():
    logits = torch.zeros(1, 2, 3)
    allowed = torch.tensor([[True, False, True], [False, False, True]])
    out = restrict_logits(logits, allowed)
    assert out.tolist() == [[[0, NEG, 0], [NEG, NEG, 0]]]
    assert torch.softmax(out.double(), -1)[0, 1].tolist() == [0.0, 0.0, 1.0]


def test_record_summary_known_answer():
    r = record_summary(torch.tensor([2.0, 4.0], dtype=torch.float64), torch.tensor([1.0, 3.0], dtype=torch.float64))
    assert r["nats_per_record"] == 3.0 and r["nats_per_record_se"] == pytest.approx(1.0)
    assert r["bits_per_real_token"] == pytest.approx(1.5 / np.log(2))
    # residuals nelbo - 1.5 tokens = [0.5, -0.5]: std 1/sqrt(2), SE 0.5, over mean tokens 2
    assert r["bits_per_real_token_se"] == pytest.approx(0.25 / np.log(2))


def test_prepare_train_eval_sample(tmp_path, capsys):
    src = tmp_path / "mols.smi"
    src.write_text("".join(s + "\n" for s in smiles_like(300)))
    out = tmp_path / "prep"
    assert main(["data", "prepare", str(src), "--records", "--out", str(out)]) == 0
    meta = read_json(out / "meta.json")
    assert meta["symbols"] == sorted(set("CNO()=c1")) and sum(v["records"] for v in meta["splits"].values()) == 300
    assert "symbols" in capsys.readouterr().out
    corpus = load_corpus(str(out), min_length=16)
    assert corpus.train.shape[1] == 16 and set(corpus.records("valid")) <= set(smiles_like(300))
    run = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--out", str(run), "--set", f"data.corpus={out}",
                 "--set", "data.length=16", "--set", "train.steps=4", "--quiet"]) == 0
    cfg = read_json(run / "model" / "config.json")
    assert cfg["tokenizer"] == "records" and cfg["tokenizer_args"]["symbols"] == meta["symbols"]
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["records"] == meta["splits"]["valid"]["records"] and r["bits_per_record"] > 0
    assert r["mean_record_tokens"] == pytest.approx(np.mean([len(s) + 1 for s in corpus.records("valid")]))
    assert main(["sample", str(run), "--num", "3", "--steps", "8", "--json", "--infill", "CC_(O)_"]) == 0
    samples = json.loads(capsys.readouterr().out)["samples"]
    for s in samples:  # the pattern's symbols stay, each blank is one symbol, the length is the pattern's
        assert len(s) == 7 and s[:2] == "CC" and s[3:6] == "(O)" and set(s) <= set("CNO()=c1")
    assert main(["sample", str(run), "--num", "2", "--steps", "8", "--json", "--prompt", "N"]) == 0
    assert all(s.startswith("N") and len(s) <= 16 for s in json.loads(capsys.readouterr().out)["samples"])
    assert "not in this vocabulary" in user_error(capsys, ["sample", run, "--infill", "CCX_"])


def test_bad_records(tmp_path, capsys):
    def prepare(name):
        return ["data", "prepare", tmp_path / name, "--records", "--out", tmp_path / "o"]

    (tmp_path / "empty.txt").write_text("ab\n\ncd\n")
    assert "Line 2" in user_error(capsys, prepare("empty.txt"))
    (tmp_path / "bad.fasta").write_text("MKV\n>x\nAA\n")
    assert "header" in user_error(capsys, prepare("bad.fasta"))
    long = tmp_path / "long.txt"
    long.write_text("".join("ab" * (1 + i % 10) + "\n" for i in range(100)))
    assert main(["data", "prepare", str(long), "--records", "--out", str(tmp_path / "p")]) == 0
    msg = user_error(capsys, ["train", "--config", "tiny", "--out", tmp_path / "r", "--set",
                              f"data.corpus={tmp_path / 'p'}", "--set", "data.length=12", "--quiet"])
    assert "data.length=21" in msg and not (tmp_path / "r" / "model").exists()
    assert main(["data", "prepare", str(long), "--records", "--out", str(tmp_path / "q"), "--max-length", "11"]) == 0
    meta = read_json(tmp_path / "q" / "meta.json")
    assert sum(v["dropped_too_long"] for v in meta["splits"].values()) == 50
    assert load_corpus(str(tmp_path / "q"), min_length=12).train.shape[1] == 12


def test_build_restricts_a_records_network_without_touching_it():
    """md4.build, given the tokenizer, adds the restriction (a forward hook; same weights and
    state dict): before a known symbol a blank is a symbol, after it the row must end; a causal
    (AR) network is left free."""
    tok = RecordTokenizer(list("ab"), length=4)
    a, m = tok.ids["a"], tok.mask_id
    x, t = torch.tensor([[m, m, a, m]]), torch.ones(1)
    torch.manual_seed(0)
    method, net = build(load_config("tiny", ["data.length=4"]), tok.vocab_size, tokenizer=tok)
    torch.manual_seed(0)
    _, free = build(load_config("tiny", ["data.length=4"]), tok.vocab_size)
    assert net.state_dict().keys() == free.state_dict().keys()
    restricted, logits = net(x, t), free(x, t)
    blocked = restricted == NEG
    assert blocked[0, :2].tolist() == [[True, True, False, False]] * 2  # no PAD, no EOS before the symbol
    assert blocked[0, 3].tolist() == [True, False, True, True]  # only EOS after it
    assert torch.equal(restricted[~blocked], logits[~blocked])
    _, ar = build(load_config("tiny", ["data.length=4", "method=ar", "model.time_cond=true"]), tok.vocab_size,
                  tokenizer=tok)
    assert not (ar(x, t) == NEG).any()


def test_model_config_of_records_is_checked(tmp_path):
    tok = RecordTokenizer(list("ab"), length=8)
    cfg = load_config("tiny", ["data.length=8"])

    def read(**change):
        meta = model_metadata(cfg, tok.vocab_size, tok.name, tok.args())
        meta["tokenizer_args"].update(change)
        (tmp_path / "config.json").write_text(json.dumps(meta))
        return read_model_config(tmp_path)[1]

    assert read().args() == {"symbols": ["a", "b"], "sep": "", "length": 8}
    with pytest.raises(UserError, match=r"config.json, tokenizer_args.symbols must be a list, got 'ab'"):
        read(symbols="ab")
    with pytest.raises(UserError, match=r"config.json, a record vocabulary must list distinct, non-empty symbols"):
        read(symbols=["a", "a"])
    with pytest.raises(UserError, match=r"config.data.length is 8, but tokenizer_args make sequences of 9"):
        read(length=9)


def test_prepared_records_files_are_checked(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text("ab\nba\naab\n" * 20)
    out = tmp_path / "prep"
    assert main(["data", "prepare", str(src), "--records", "--out", str(out)]) == 0
    assert "--hf prepares text corpora, not --records" in user_error(
        capsys, ["data", "prepare", src, "--records", "--hf", "x", "--out", tmp_path / "o"])
    np.save(out / "valid_ids.npy", np.array([2, 3, 9], dtype=np.uint8))  # 9: outside a, b
    with pytest.raises(UserError, match="valid split of .* is damaged"):
        load_corpus(str(out), min_length=8)
    meta = read_json(out / "meta.json")
    (out / "meta.json").write_text(json.dumps({**meta, "symbols": "ab"}))
    with pytest.raises(UserError, match=r"meta.json, symbols must be a list"):
        load_corpus(str(out), min_length=8)
