"""The evaluation suite from the command line: the baselines through train / eval / sample / load,
several models in one markdown table, zero-shot sets (local copies, detokenizers, a clear error
when they cannot be fetched), and bad input."""

import json
import math

import pytest
import torch

import md4
from md4.cli import main
from md4.data import CharTokenizer, eval_chunks, load_corpus, zeroshot
from md4.evaluate import eval_table


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def user_error(capsys, argv) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("md4: error: ") and lines[0].endswith("."), err
    return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """tiny runs of the two baselines (20 steps each)."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    out = {}
    try:
        for method in ("ar", "sedd"):
            out[method] = tmp_path_factory.mktemp("runs") / method
            argv = ["train", "--config", "tiny", "--out", str(out[method]), "--set", f"data.corpus={corpus}",
                    "--set", f"method={method}", "--quiet"]
            assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return out


# ----------------------------------------------------------------------------- baselines end to end
def test_ar_eval_is_its_exact_likelihood(runs, corpus, capsys):
    """`md4 eval` of an AR run reports exactly sum_n -log p(x^n | x^<n) per sequence (recomputed
    here from the network's logits, one prefix at a time), whatever K is: no Monte Carlo, SE from
    the sequences only."""
    m = md4.load(runs["ar"])
    assert m.net.causal
    chunks = eval_chunks(load_corpus(str(corpus), min_length=m.length).valid, m.length)[:6]
    with torch.no_grad():
        nll = torch.zeros(len(chunks), dtype=torch.float64)
        for n in range(m.length):
            prefix = torch.cat([torch.full((len(chunks), 1), m.method.bos_id), chunks[:, :n]], 1)
            logp = torch.log_softmax(m.net(prefix, torch.zeros(len(chunks)))[:, -1].double(), -1)
            nll -= logp.gather(-1, chunks[:, n : n + 1]).squeeze(-1)
    want = nll.mean().item() / (m.length * math.log(2))
    for k in ("1", "3"):
        assert main(["eval", str(runs["ar"]), "--limit", "6", "--mc-samples", k, "--json"]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r["bits_per_token"] == pytest.approx(want, rel=1e-5)
        assert r["bits_per_token_se"] == pytest.approx(nll.std().item() / math.sqrt(6) / (m.length * math.log(2)),
                                                       rel=1e-4)
        assert r["bound"] == "exact" and r["mc_samples"] == 1 and r["method"] == "ar"


def test_baselines_sample_and_load(runs, capsys):
    for method, run in runs.items():
        m = md4.load(run)
        assert type(m.method).__name__ == method.upper()
        assert main(["sample", str(run), "--num", "2", "--steps", "8", "--json"]) == 0
        texts = json.loads(capsys.readouterr().out)["samples"]
        assert len(texts) == 2 and all(len(t) == m.length and set(t) <= set(CharTokenizer.alphabet) for t in texts)


def test_several_models_make_one_markdown_table(runs, trained_run, capsys):
    assert main(["eval", str(runs["ar"]), str(runs["sedd"]), str(trained_run), "--limit", "4",
                 "--mc-samples", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| model | method | corpus | split | bits/token ± SE | ppl | #seqs | K | bound |"
    assert len(lines) == 5 and all(line.startswith("|") and line.count("|") == 10 for line in lines)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [c[1] for c in cells] == ["ar", "sedd", "md4"]
    assert [c[8] for c in cells] == ["exact", "continuous time", "continuous time"]
    assert [c[7] for c in cells] == ["1", "2", "2"] and all(c[6] == "4" and c[3] == "valid" for c in cells)
    for c in cells:
        bpc, se = (float(v) for v in c[4].split("±"))
        assert float(c[5]) == pytest.approx(2 ** bpc, rel=1e-3)  # perplexity = 2^(bits per token)
        assert se > 0
    # a single model keeps the one-line output
    assert main(["eval", str(trained_run), "--limit", "4", "--timesteps", "10"]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "bits/token" in line and "NELBO T=10" in line


def test_eval_table_formats_given_rows():
    r = {"model": "m", "method": "md4", "corpus": "c", "split": "test", "bits_per_token": 1.23456,
         "bits_per_token_se": 0.01234, "perplexity": 2.3456, "sequences": 7, "mc_samples": 4, "timesteps": 1000}
    assert eval_table([r]).splitlines()[2] == "| m | md4 | c | test | 1.2346 ± 0.0123 | 2.346 | 7 | 4 | T=1000 |"


# ----------------------------------------------------------------------------- zero-shot
@pytest.fixture
def data_home(tmp_path, monkeypatch):
    """$MD4_DATA and the cache in a temporary folder; no network (downloads fail at once)."""
    monkeypatch.setenv("MD4_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(zeroshot, "fetch", offline)
    monkeypatch.setattr(zeroshot, "from_datasets", lambda ds: (_ for _ in ()).throw(ImportError()))
    return tmp_path / "data"


def test_zero_shot_set_from_a_local_copy(data_home, trained_run, capsys):
    text = "the man said he do n't know N things .\n" * 40
    data_home.mkdir()
    (data_home / "ptb.test.txt").write_text(text)
    c = zeroshot.load_zero_shot("ptb")
    assert CharTokenizer().decode(c.test).startswith("the man said he don t know things the man")
    assert len(c.train) == len(c.valid) == 0
    assert main(["eval", str(trained_run), "--data", "ptb", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["corpus"] == "ptb" and r["split"] == "test"
    assert r["sequences"] == len(c.test) // 32  # cut into the model's length, remainder dropped
    (data_home / "lambada_test.jsonl").write_text("\n".join(json.dumps({"text": f"Passage {i}, here."})
                                                            for i in range(20)))
    assert CharTokenizer().decode(zeroshot.load_zero_shot("lambada").test).startswith("passage here passage here")


def test_zero_shot_errors(data_home, trained_run, capsys):
    err = user_error(capsys, ["eval", trained_run, "--data", "wikitext2"])
    assert "WikiText-2 was not found" in err and "internet" in err and "wikitext-2-raw/wiki.test.raw" in err
    err = user_error(capsys, ["eval", trained_run, "--data", "lambada"])
    assert "download failed (network unreachable)" in err
    data_home.mkdir()
    (data_home / "ptb.test.txt").write_text("a b c\n" * 100)
    assert "test split only" in user_error(capsys, ["eval", trained_run, "--data", "ptb", "--split", "valid"])
    (data_home / "lambada_test.jsonl").write_text("not json\n")
    assert "JSON lines" in user_error(capsys, ["eval", trained_run, "--data", "lambada"])


# ----------------------------------------------------------------------------- bad input
def test_bad_input(runs, trained_run, capsys, tmp_path):
    assert "continuous-time bound only" in user_error(capsys, ["eval", runs["sedd"], "--timesteps", "10"])
    assert "No model or run folder" in user_error(capsys, ["eval", trained_run, tmp_path / "none"])
    assert "--num must be at least 1" in user_error(capsys, ["genppl", trained_run, "--judge", "x", "--num", "0"])
    assert "No GGUF file" in user_error(capsys, ["genppl", trained_run, "--judge", tmp_path / "judge.gguf"])
    assert "Unknown method" in user_error(capsys, ["train", "--config", "tiny", "--out", tmp_path / "r",
                                                   "--set", "method=d3pm"])
    assert "log-linear" in user_error(capsys, ["train", "--config", "tiny", "--out", tmp_path / "r",
                                               "--set", "method=sedd", "--set", "schedule=cosine"])
