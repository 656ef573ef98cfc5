"""Zero-shot sets by the model's own tokenizer: each reader and detokenizer on a small file in its
dataset's real format (written here), the GPT-2 protocol (records detokenized, <|endoftext|> after
each, concatenated, cut into the model's length), the text8 protocol for character models, text
files tokenized the model's way, and one sentence for an image model."""

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import md4
from md4.cli import main
from md4.data import detokenize, normalize_text8, zeroshot
from md4.data.chars import CharTokenizer
from md4.errors import UserError
from test_eval_suite import data_home  # noqa: F401  (fixture: $MD4_DATA in a temporary folder, offline)

# ----------------------------------------------------------------------------- files in their real formats
# WikiText-*-raw wiki.test.raw: every line starts with a space, blank lines are " ", tokens split by spaces
WIKI_RAW = (" \n = Robert Boulter = \n \n"
            " Robert Boulter is an English film , television and theatre actor . He had a guest @-@ starring role"
            " in 2000 ( aged 3 @,@ 000 ) . \n \n = = Career = = \n \n"
            " \" We do n't know \" , she said ; it 's 2 @.@ 5 m . \n")
WIKI_RECORDS = ["", " = Robert Boulter =\n", "",
                " Robert Boulter is an English film, television and theatre actor. He had a guest-starring role"
                " in 2000 (aged 3,000).\n", "", " == Career ==\n", "",
                " \"We do n't know\", she said; it's 2.5 m.\n"]
# Mikolov's ptb.test.txt: lower case, a leading space, " N " for numbers, <unk>
PTB_RAW = (" no it was n't black monday \n"
           " the dow jones industrial average plunged N points or N N to $ N <unk> \n"
           " N years ago mr. <unk> 's company said \n")
PTB_RECORDS = ["no it wasn't black monday", "the dow jones industrial average plunged 1 points or 1 1 to $1 ?",
               "N years ago mr. ?'s company said"]
# One Billion Words held-out shards: one tokenized sentence a line
LM1B_SHARDS = ["The company 's shares rose 5 % to $ 20 , analysts said .\n\" It 's over , \" he said ( again ) !\n",
               "Visit http : / / example.com / news for more ?\n"]
LM1B_RECORDS = ["The company's shares rose 5 % to $20, analysts said.", "\"It's over,\" he said (again)!",
                "Visit http://example.com/news for more?"]
# OpenAI's lambada_test.jsonl: {"text": passage} per line, curly quotes
LAMBADA_RAW = "\n".join(json.dumps({"text": t}) for t in [
    "  \u201cCome here,\u201d she said. He looked at the door and then at the window ",
    "It was late when the train finally reached the station"]) + "\n"
LAMBADA_RECORDS = ["\n\"Come here,\" she said. He looked at the door and then at the window",
                   "\nIt was late when the train finally reached the station"]


def write_sets(folder, copies: int = 1):
    """The four formats under their standard names in `folder` (each text repeated `copies` times)."""
    (folder / "wikitext-2-raw").mkdir(parents=True)  # (folder too)
    (folder / "wikitext-2-raw" / "wiki.test.raw").write_text(WIKI_RAW * copies)
    (folder / "ptb.test.txt").write_text(PTB_RAW * copies)
    heldout = folder / zeroshot.LM1B_DIR
    heldout.mkdir(parents=True)
    for k, text in enumerate(LM1B_SHARDS):
        (heldout / f"news.en.heldout-{k:05d}-of-00050").write_text(text * copies)
    (folder / "lambada_test.jsonl").write_text(LAMBADA_RAW * copies)


def detokenized(name: str) -> list[str]:
    ds = zeroshot.ZERO_SHOT[name]
    return [detokenize.DETOKENIZERS[ds.detokenizer](r) for r in zeroshot.raw_records(name)]


def test_readers_and_detokenizers_on_files_in_the_real_formats(data_home):
    write_sets(data_home)
    assert zeroshot.raw_records("wikitext2")[:3] == ["", " = Robert Boulter = \n", ""]  # rows as `datasets` gives
    assert detokenized("wikitext2") == WIKI_RECORDS
    assert zeroshot.raw_records("ptb")[0] == "no it was n't black monday"
    assert detokenized("ptb") == PTB_RECORDS
    assert detokenized("lm1b") == LM1B_RECORDS  # both shards of the held-out folder, in order
    assert detokenized("lambada") == LAMBADA_RECORDS


def test_detokenizer_quirks_kept_from_the_reference_code():
    assert detokenize.wikitext("a N N N b") == "a 1 N 1 b"  # one pass of " N " -> " 1 "
    assert detokenize.ptb("a N N N b") == "a 1 1 1 b"  # every N between spaces
    assert detokenize.lm1b("I do n't know .") == "I do n't know."  # n't stays split in LM1B
    assert detokenize.wikitext("the players ' union") == "the players' union"
    assert detokenize.ptb("the u.s. \\/ canada") == "the u.s. / canada"


def test_lm1b_single_shard_and_rows_from_the_datasets_package(data_home, monkeypatch):
    (data_home / "lm1b").mkdir(parents=True)
    (data_home / "lm1b" / "news.en.heldout-00000-of-00050").write_text(LM1B_SHARDS[1])
    assert detokenized("lm1b") == LM1B_RECORDS[2:]
    # no local copy: the rows of datasets.load_dataset(path, config, split=...)[field]
    monkeypatch.undo()
    monkeypatch.setenv("MD4_DATA", str(data_home / "elsewhere"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(data_home / "cache"))
    calls = []

    def load_dataset(path, config, split):
        calls.append((path, config, split))
        return [{"text": line if line.strip() else ""} for line in zeroshot.lines(WIKI_RAW)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert detokenized("wikitext103") == WIKI_RECORDS and calls == [("wikitext", "wikitext-103-raw-v1", "test")]


@pytest.fixture(scope="module")
def gpt2():
    pytest.importorskip("tiktoken", reason="the GPT-2 tokenizer needs tiktoken")
    from test_bpe import MERGES

    found = next((p.resolve() for p in MERGES if p.is_file()), None)
    if found is None:
        pytest.skip("../shared/data/tokenizers/gpt2.tiktoken is absent")
    mp = pytest.MonkeyPatch()
    mp.setenv("MD4_GPT2_TIKTOKEN", str(found))
    from md4.data.bpe import GPT2Tokenizer

    yield GPT2Tokenizer()
    mp.undo()


def test_gpt2_protocol_records_end_with_endoftext(data_home, gpt2):
    """Each detokenized record, encoded, then <|endoftext|>; the records in order (a blank WikiText
    line is a lone separator); the character protocol on the same files is text8."""
    write_sets(data_home)
    for name, records in (("wikitext2", WIKI_RECORDS), ("ptb", PTB_RECORDS), ("lm1b", LM1B_RECORDS),
                          ("lambada", LAMBADA_RECORDS)):
        c = zeroshot.load_zero_shot(name, gpt2)
        want = [i for r in records for i in gpt2.encode(r).tolist() + [50256]]
        assert c.test.tolist() == want, name
        assert c.tokenizer is gpt2 and len(c.train) == len(c.valid) == 0
    assert gpt2.decode(zeroshot.load_zero_shot("lambada", gpt2).test[:4]) == '\n"Come here'
    chars = zeroshot.load_zero_shot("ptb")  # the default: characters
    assert CharTokenizer().decode(chars.test) == normalize_text8("\n".join(PTB_RECORDS)) == (
        "no it wasn t black monday the dow jones industrial average plunged points or to "
        "n years ago mr s company said")


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, gpt2):
    """A tiny MD4 on GPT-2 tokens (length 32), trained 2 steps on a prepared folder."""
    from md4.data.prepare import prepare

    root = tmp_path_factory.mktemp("bpe")
    (root / "book.txt").write_text("The king said unto his lord that we shall go to London tomorrow.\n" * 300)
    prepare([root / "book.txt"], root / "prepared", valid=0.2, workers=1, piece_chars=400, progress=False)
    argv = ["train", "--config", "tiny", "--out", str(root / "run"), "--quiet"]
    sets = [f"data.corpus={root / 'prepared'}", "train.steps=2", "train.eval_every=2", "train.ckpt_every=2"]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0
    return root / "run"


def test_bpe_model_evaluates_zero_shot_sets_and_text_files_in_gpt2_tokens(data_home, bpe_run, gpt2, capsys):
    torch.set_num_threads(1)
    write_sets(data_home, copies=12)
    for name in ("ptb", "wikitext2"):
        assert main(["eval", str(bpe_run), "--data", name, "--json"]) == 0
        r = json.loads(capsys.readouterr().out)
        n = len(zeroshot.load_zero_shot(name, gpt2).test)
        assert (r["corpus"], r["split"], r["sequences"], r["length"]) == (name, "test", n // 32, 32)
        assert 10 < r["bits_per_token"] < 20  # near log2(50257) = 15.6 after 2 steps; 27 characters give < 5
    text = "Hello there, my lord. " * 200
    (data_home / "plain.txt").write_text(text)
    m = md4.load(bpe_run)
    c = zeroshot.eval_corpus(str(data_home / "plain.txt"), m.tokenizer, min_length=33)
    ids = gpt2.encode(text)
    assert c.tokenizer.name == "gpt2" and np.array_equal(np.concatenate([c.train, c.valid, c.test]), ids)
    assert main(["eval", str(bpe_run), "--data", str(data_home / "plain.txt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sequences"] == len(c.valid) // 32


def test_image_model_is_refused_text_in_one_sentence(data_home, tmp_path, monkeypatch, capsys):
    from test_image_cli import train_images

    run = train_images(tmp_path, monkeypatch, "train.steps=1", "train.eval_every=1", "train.ckpt_every=1")
    write_sets(data_home)
    (data_home / "plain.txt").write_text("some text " * 100)
    for data in ("ptb", str(data_home / "plain.txt")):
        assert main(["eval", str(run), "--data", data]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is text, but the model reads image tokens, which cannot represent it" in err[0], err
        assert Path(data).name in err[0] or "PTB" in err[0]
    with pytest.raises(UserError, match="PTB is text, but the model reads image tokens"):
        zeroshot.load_zero_shot("ptb", md4.load(run).tokenizer)
