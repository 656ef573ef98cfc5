"""Tests for the `md4` command: train / eval / sample end to end, and bad input: one sentence on
stderr, exit status 2, no traceback, no user file overwritten or lost."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import md4
from md4 import checkpoint
from md4.cli import main
from md4.config import load_config
from md4.data import CharTokenizer, eval_chunks, load_corpus

sys.path.insert(0, str(Path(__file__).resolve().parent))
import md4proc  # noqa: E402

ALPHABET = set(CharTokenizer.alphabet)


def tiny(corpus, *sets) -> list[str]:
    """`--config tiny` with the test corpus and extra --set overrides."""
    out = ["--config", "tiny", "--set", f"data.corpus={corpus}"]
    for s in sets:
        out += ["--set", s]
    return out + ["--quiet"]


def snapshot(folder: Path) -> dict:
    """Every file under folder (hidden ones included) -> its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def user_error(capsys, argv) -> str:
    """Run md4 in process; it must fail with exit status 2 and one sentence on stderr. Returns the sentence."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("md4: error: ") and lines[0].endswith((".", "?")), err
    return lines[0]



@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models run fastest on one thread, and a busy machine cannot oversubscribe it
    (conftest.py restores torch's thread count after each test)."""
    torch.set_num_threads(1)

# ---- help -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["sample"], ["demo"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main(command + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: md4")
    assert ("--out" in out) if command in (["train"], ["demo"]) else True


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    assert "usage: md4" in capsys.readouterr().err


# ---- train / eval / sample end to end --------------------------------------------------------


def test_train_writes_a_complete_run_folder(trained_run, corpus):
    run = trained_run
    cfg = load_config("tiny", [f"data.corpus={corpus}"])
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "checkpoints", "model", "training_curve.png"} <= names
    assert not [n for n in names if n.startswith(".") and n != ".lock"]  # no temporary files left behind
    # config.yaml is the run's full config and loads back as a config file
    assert load_config(str(run / "config.yaml")) == cfg
    assert yaml.safe_load((run / "config.yaml").read_text()) == cfg.to_dict()
    # metrics: a training loss every step (log_every 1), validation every 10 steps, all finite
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if "loss_bpc" in r]
    assert [r["step"] for r in train_recs] == list(range(1, cfg.train.steps + 1))
    assert [r["step"] for r in recs if "valid_bpc" in r] == [10, 20]
    assert all(math.isfinite(v) for r in recs for v in r.values())
    assert all(0 < r["loss_bpc"] < 10 and r["lr"] > 0 for r in train_recs)
    # only the last `keep` checkpoints (every 5 steps), each complete
    cks = checkpoint.checkpoints(run)
    assert [p.name for p in cks] == ["step_00000015", "step_00000020"]
    assert not [p for p in (run / "checkpoints").iterdir() if p not in cks]
    for ck in cks:
        assert {p.name for p in ck.iterdir()} == {"model.safetensors", "ema.safetensors", "optim.pt", "state.json"}
        assert checkpoint.load_checkpoint(ck)["state"]["step"] == int(ck.name[5:])
    # the model folder: metadata + the EMA weights of the last checkpoint
    meta = json.loads((run / "model" / "config.json").read_text())
    assert meta["format"] == "md4" and meta["vocab_size"] == 27 and meta["tokenizer"] == "char"
    assert meta["config"] == cfg.to_dict()
    assert {p.name for p in (run / "model").iterdir()} == {"config.json", "model.safetensors"}
    final, ema = load_file(str(run / "model" / "model.safetensors")), load_file(str(cks[-1] / "ema.safetensors"))
    assert final.keys() == ema.keys() and all(torch.equal(final[k], ema[k]) for k in final)
    assert (run / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_load_and_sample(trained_run):
    m = md4.load(trained_run)
    assert m.length == 32 and m.source == trained_run / "model"
    assert not m.net.training
    x = m.sample(2, steps=8)
    assert x.shape == (2, 32) and x.dtype == torch.long
    assert int(x.min()) >= 0 and int(x.max()) < 27  # every position unmasked (mask id = 27)
    assert torch.equal(m.sample(2, steps=8, seed=0), x)  # seeded
    texts = m.decode(x)
    assert len(texts) == 2 and all(len(t) == 32 and set(t) <= ALPHABET for t in texts)
    # the model folder itself loads to the same weights
    m2 = md4.load(trained_run / "model")
    assert all(torch.equal(a, b) for a, b in zip(m.net.state_dict().values(), m2.net.state_dict().values()))


def eval_json(capsys, run, *extra) -> dict:
    assert main(["eval", str(run), "--json", *map(str, extra)]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_json_is_consistent(trained_run, corpus, capsys):
    r = eval_json(capsys, trained_run)
    n_valid = len(eval_chunks(load_corpus(str(corpus), min_length=32).valid, 32))
    assert r["sequences"] == n_valid > 100 and r["length"] == 32
    assert r["split"] == "valid" and r["mc_samples"] == 1 and r["timesteps"] == 0
    assert r["corpus"] == corpus.name
    bpt, se = r["bits_per_token"], r["bits_per_token_se"]
    assert 1.0 < bpt < 6.0 and 0 < se < 0.2 * bpt
    assert r["perplexity"] == pytest.approx(math.exp(bpt * math.log(2)), rel=1e-12)
    assert r["nats_per_sequence"] == pytest.approx(bpt * 32 * math.log(2), rel=1e-12)
    # deterministic for a given seed; and the human-readable form reports the same numbers
    assert eval_json(capsys, trained_run) == r
    assert main(["eval", str(trained_run)]) == 0
    text = capsys.readouterr().out
    assert f"{bpt:.4f} ± {se:.4f} bits/token" in text and f"perplexity {r['perplexity']:.3f}" in text


def test_eval_more_mc_samples_do_not_widen_the_error_bar(trained_run, capsys):
    one = eval_json(capsys, trained_run, "--mc-samples", 1)
    four = eval_json(capsys, trained_run, "--mc-samples", 4)
    assert four["mc_samples"] == 4 and four["sequences"] == one["sequences"]
    assert four["bits_per_token_se"] < one["bits_per_token_se"]  # stratified draws of t: about 0.065 vs 0.090
    # both estimate the same NELBO
    both_se = math.hypot(one["bits_per_token_se"], four["bits_per_token_se"])
    assert abs(four["bits_per_token"] - one["bits_per_token"]) < 4 * both_se


def test_eval_options(trained_run, corpus, capsys):
    r = eval_json(capsys, trained_run, "--split", "test", "--limit", 20, "--timesteps", 50, "--batch-size", 7)
    assert r["split"] == "test" and r["sequences"] == 20 and r["timesteps"] == 50
    assert math.isfinite(r["bits_per_token"])
    # zero-shot on another text file
    other = corpus.parent / "other.txt"
    other.write_text("a completely different text about cats and dogs " * 200)
    r = eval_json(capsys, trained_run, "--data", other, "--limit", 10)
    assert r["corpus"] == "other.txt" and r["sequences"] == 10


def test_sample_prints_samples(trained_run, capsys):
    assert main(["sample", str(trained_run), "--num", "2", "--steps", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "--- sample 0 ---" and out[2] == "--- sample 1 ---" and len(out) == 4
    assert all(len(s) == 32 and set(s) <= ALPHABET for s in (out[1], out[3]))
    assert main(["sample", str(trained_run), "--num", "3", "--steps", "8", "--length", "20", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert len(r["samples"]) == 3 and all(len(s) == 20 and set(s) <= ALPHABET for s in r["samples"])
    # the printed text is the library's sample for the same seed
    assert main(["sample", str(trained_run), "--num", "2", "--steps", "8", "--json", "--seed", "5"]) == 0
    m = md4.load(trained_run)
    assert json.loads(capsys.readouterr().out)["samples"] == m.decode(m.sample(2, steps=8, seed=5))


# ---- bad input: train -------------------------------------------------------------------------


@pytest.fixture
def run_copy(tmp_path, trained_run):
    """A copy of the finished tiny run that a test may try (and fail) to resume."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


def bad_corpus(tmp_path, kind: str) -> Path:
    path = tmp_path / f"{kind}.txt"
    if kind == "missing":
        return path
    if kind == "folder":
        path.mkdir()
    else:
        path.write_text({"empty": "", "no_letters": "123 456 !!! ...\n", "short": "hello world " * 20}[kind])
    return path


@pytest.mark.parametrize(
    "kind, words",
    [
        ("missing", ["missing.txt"]),
        ("folder", ["folder.txt", "directory"]),
        ("empty", ["empty"]),
        ("no_letters", ["empty"]),
        ("short", ["fewer than", "sequence length"]),
    ],
)
def test_train_bad_corpus(tmp_path, run_copy, capsys, kind, words):
    path = bad_corpus(tmp_path, kind)
    before, corpus_before = snapshot(run_copy), path.read_bytes() if path.is_file() else None
    msg = user_error(capsys, ["train", "--out", run_copy, *tiny(path)])
    for w in words:
        assert w in msg
    assert snapshot(run_copy) == before
    assert (path.read_bytes() if path.is_file() else None) == corpus_before


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--set", "model.foo=1"], ["model.foo"]),
        (["--set", "foo.bar=1"], ["foo"]),
        (["--set", "train.lr=abc"], ["train.lr", "float"]),
        (["--set", "model.layers=2.5"], ["model.layers", "int"]),
        (["--set", "model.glu=perhaps"], ["model.glu", "bool"]),
        (["--set", "train.steps"], ["key=value"]),
        (["--config", "no_such_preset"], ["no_such_preset", "tiny"]),
        (["--set", "model.heads=3"], ["divisible"]),
        (["--set", "train.bf16=sometimes"], ["train.bf16"]),
        (["--set", "train.device=quantum"], ["quantum"]),
        (["--set", "train.eval_every=0"], ["train.eval_every", "at least 1"]),
        (["--set", "data.length=0"], ["data.length", "at least 1"]),
        pytest.param(["--set", "train.device=cuda"], ["cuda", "no CUDA GPU"],
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")),
    ],
)
def test_train_bad_config(run_copy, corpus, capsys, argv, words):
    before = snapshot(run_copy)
    msg = user_error(capsys, ["train", "--out", run_copy, *tiny(corpus), *argv])
    for w in words:
        assert w in msg
    assert snapshot(run_copy) == before


def test_train_invalid_yaml_file(tmp_path, run_copy, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {dim: 64\ntrain: [\n")
    before = snapshot(run_copy)
    msg = user_error(capsys, ["train", "--config", bad, "--out", run_copy])
    assert "bad.yaml" in msg and "YAML" in msg
    assert bad.read_text() == "model: {dim: 64\ntrain: [\n"
    assert snapshot(run_copy) == before


def garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 8)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def drop_rng_key(path: Path) -> None:
    state = json.loads(path.read_text())
    del state["noise_rng"]
    path.write_text(json.dumps(state))


@pytest.mark.parametrize(
    "name, damage",
    [
        ("model.safetensors", garbage),
        ("model.safetensors", truncate),
        ("ema.safetensors", truncate),
        ("optim.pt", truncate),
        ("optim.pt", garbage),
        ("state.json", truncate),
        ("state.json", drop_rng_key),
    ],
)
def test_resume_from_a_damaged_checkpoint(run_copy, corpus, capsys, name, damage):
    newest = checkpoint.checkpoints(run_copy)[-1]
    damage(newest / name)
    before = snapshot(run_copy)
    msg = user_error(capsys, ["train", "--out", run_copy, *tiny(corpus)])
    assert newest.name in msg and name in msg
    assert snapshot(run_copy) == before  # the damaged checkpoint is still there, unchanged


@pytest.mark.parametrize("override", ["model.dim=64", "model.layers=3", "model.glu=false"])
def test_resume_with_a_different_model_shape(run_copy, corpus, capsys, override):
    before = snapshot(run_copy)
    msg = user_error(capsys, ["train", "--out", run_copy, *tiny(corpus, override)])
    assert override.split("=")[0] in msg and "config.yaml" in msg  # the run's own config says otherwise
    assert snapshot(run_copy) == before
    (run_copy / "config.yaml").unlink()  # without it, the checkpoint's weights do not fit either
    before = snapshot(run_copy)
    msg = user_error(capsys, ["train", "--out", run_copy, *tiny(corpus, override)])
    assert "do not match the model configuration" in msg and "step_00000020" in msg
    assert snapshot(run_copy) == before


def test_non_finite_loss_stops_and_keeps_good_checkpoints(run_copy, corpus, capsys):
    """A huge learning rate without clipping makes the loss NaN within two steps: exit 2, the
    earlier checkpoints and model are untouched, and no checkpoint holds non-finite weights."""
    (run_copy / "config.yaml").unlink()  # the run's own config would refuse another train.lr
    kept = {p: b for p, b in snapshot(run_copy).items() if p.parts[0] in ("checkpoints", "model")}
    msg = user_error(capsys, ["train", "--out", run_copy,
                              *tiny(corpus, "train.steps=40", "train.lr=1e30", "train.grad_clip=0",
                                    "train.ckpt_every=1", "train.keep=10")])
    assert "loss became nan" in msg or "loss became inf" in msg
    assert "train.lr" in msg
    now = snapshot(run_copy)
    assert {p: now[p] for p in kept} == kept
    cks = checkpoint.checkpoints(run_copy)
    assert [p.name for p in cks][:2] == ["step_00000015", "step_00000020"] and len(cks) <= 4
    for ck in cks:
        loaded = checkpoint.load_checkpoint(ck)
        for part in ("model", "ema"):
            assert all(torch.isfinite(v).all() for v in loaded[part].values()), (ck.name, part)
    assert not list((run_copy / "checkpoints").glob(".*"))


# ---- bad input: eval and sample ---------------------------------------------------------------


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_missing_folder(tmp_path, capsys, command):
    msg = user_error(capsys, [command, tmp_path / "nowhere"])
    assert "nowhere" in msg


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_run_without_a_model(tmp_path, run_copy, capsys, command):
    shutil.rmtree(run_copy / "model")
    msg = user_error(capsys, [command, run_copy])
    assert "no trained model" in msg


@pytest.mark.parametrize("command", ["eval", "sample"])
@pytest.mark.parametrize("damage", [truncate, garbage])
def test_damaged_model(tmp_path, trained_run, capsys, command, damage):
    model = tmp_path / "model"
    shutil.copytree(trained_run / "model", model)
    damage(model / "model.safetensors")
    before = snapshot(model)
    msg = user_error(capsys, [command, model])
    assert "model.safetensors" in msg and "corrupt or truncated" in msg
    assert snapshot(model) == before


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_model_with_a_broken_config(tmp_path, trained_run, capsys, command):
    model = tmp_path / "model"
    shutil.copytree(trained_run / "model", model)
    (model / "config.json").write_text('{"format": "md4", "config": {"model": {"dim": ')
    assert "config.json" in user_error(capsys, [command, model])


def test_bad_eval_and_sample_options(tmp_path, trained_run, capsys):
    assert "--mc-samples" in user_error(capsys, ["eval", trained_run, "--mc-samples", 0])
    assert "--batch-size" in user_error(capsys, ["eval", trained_run, "--batch-size", 0])
    assert "--num" in user_error(capsys, ["sample", trained_run, "--num", 0])
    assert "missing.txt" in user_error(capsys, ["eval", trained_run, "--data", tmp_path / "missing.txt"])
    assert "--timesteps" in user_error(capsys, ["eval", trained_run, "--timesteps", -1])
    assert "at most 1024 tokens" in user_error(capsys, ["sample", trained_run, "--length", 5000])
    for command in ("eval", "sample"):
        assert "quantum" in user_error(capsys, [command, trained_run, "--device", "quantum"])
        if not torch.cuda.is_available():
            assert "no CUDA GPU" in user_error(capsys, [command, trained_run, "--device", "cuda"])


@pytest.mark.parametrize("argv", [["eval", "RUN", "--split", "validation"], ["sample", "RUN", "--grid", "random"],
                                  ["eval", "RUN", "--mc-samples", "two"]])
def test_argparse_errors_exit_2(trained_run, capsys, argv):
    with pytest.raises(SystemExit) as e:
        main([str(trained_run) if a == "RUN" else a for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid" in err and "Traceback" not in err


# ---- the real command: exit status and stderr of a separate process ---------------------------


def test_real_exit_status_and_stderr(tmp_path, trained_run, corpus):
    """Three md4 processes in parallel: a missing corpus, a truncated model, an unknown --split. The first
    is `python -m md4` started from scratch (what imports print would show: nothing); the others are
    forked from tests/md4proc.py's server, which has imported md4 and torch (the same __main__, exit
    status and file descriptors, without 3 CPU-seconds of imports each)."""
    model = tmp_path / "model"
    shutil.copytree(trained_run / "model", model)
    truncate(model / "model.safetensors")
    env = {k: v for k, v in os.environ.items() if k != "MD4_DATA"}
    cases = {
        "model": (["eval", str(model)], "corrupt or truncated"),
        "corpus": (["train", "--out", str(tmp_path / "run"), *tiny(tmp_path / "missing.txt")], "missing.txt"),
        "split": (["eval", str(trained_run), "--split", "nope"], "invalid choice"),
    }
    procs = {k: md4proc.start(argv, env) for k, (argv, _) in cases.items() if k != "model"}
    procs["model"] = subprocess.Popen([sys.executable, "-m", "md4", *cases["model"][0]], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env)
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (key, err)
        assert "Traceback" not in err and out == ""
        assert cases[key][1] in err
        if key != "split":  # argparse adds its usage line before the error
            assert err.count("\n") == 1 and err.startswith("md4: error: ")
