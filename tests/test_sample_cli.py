"""`md4 sample` with samplers, truncation, prompts, infilling, blocks and traces (the tiny run of
conftest.py), and its bad input: one sentence, exit status 2."""

import json

import pytest
import torch
from test_cli import user_error

import md4
from md4.cli import main
from md4.data import CharTokenizer

ALPHABET = set(CharTokenizer.alphabet)
pytestmark = pytest.mark.usefixtures("one_thread")


def samples(capsys, run, *argv) -> list[str]:
    assert main(["sample", str(run), "--json", *map(str, argv)]) == 0
    return json.loads(capsys.readouterr().out)["samples"]


@pytest.mark.parametrize("sampler", ["ancestral", "cached", "mean", "jump", "confidence"])
def test_every_sampler_from_the_command_line_is_the_librarys(trained_run, capsys, sampler):
    out = samples(capsys, trained_run, "--num", 2, "--steps", 8, "--sampler", sampler, "--top-p", 0.9, "--seed", 3)
    m = md4.load(trained_run)
    assert out == m.decode(m.sample(2, steps=8, sampler=sampler, top_p=0.9, seed=3))
    assert all(len(s) == 32 and set(s) <= ALPHABET for s in out)


def test_cached_gives_the_ancestral_samples_of_the_trained_model(trained_run):
    m = md4.load(trained_run)
    assert torch.equal(m.sample(4, steps=300, seed=1), m.sample(4, steps=300, seed=1, sampler="cached"))


def test_prompt_infill_and_blocks(trained_run, capsys):
    out = samples(capsys, trained_run, "--num", 3, "--steps", 8, "--prompt", "To be or")
    assert all(s.startswith("to be or") and len(s) == 32 for s in out)
    pattern = "The ____ sat on the ____"
    out = samples(capsys, trained_run, "--num", 3, "--steps", 8, "--infill", pattern, "--sampler", "jump")
    for s in out:
        assert len(s) == len(pattern)
        assert all(c == p.lower() for c, p in zip(s, pattern) if p != "_")
    out = samples(capsys, trained_run, "--num", 2, "--steps", 8, "--length", 100, "--block", 8, "--prompt", "hello")
    assert all(len(s) == 100 and s.startswith("hello") and set(s) <= ALPHABET for s in out)
    # longer than the network's position table: only in blocks
    out = samples(capsys, trained_run, "--num", 1, "--steps", 4, "--length", 1500, "--block", 30, "--sampler", "jump")
    assert len(out[0]) == 1500


def test_temperature_zero_is_top_k_one(trained_run, capsys):
    a = samples(capsys, trained_run, "--num", 2, "--steps", 8, "--temperature", 0)
    assert a == samples(capsys, trained_run, "--num", 2, "--steps", 8, "--top-k", 1)


@pytest.mark.parametrize("suffix", [".html", ".png", ".gif"])
def test_trace_is_written(trained_run, capsys, tmp_path, suffix):
    path = tmp_path / f"trace{suffix}"
    samples(capsys, trained_run, "--num", 2, "--steps", 16, "--trace", path, "--prompt", "the")
    assert path.stat().st_size > 100
    if suffix == ".html":
        page = path.read_text()
        assert page.count('<div class="row">') >= 3 and 'class="new"' in page and 'class="mask"' in page


def test_bad_sampling_options(trained_run, capsys, tmp_path):
    assert "bogus" in user_error(capsys, ["sample", trained_run, "--sampler", "bogus"])
    assert "top-p" in user_error(capsys, ["sample", trained_run, "--top-p", 1.5])
    assert "top-k" in user_error(capsys, ["sample", trained_run, "--top-k", -1])
    assert "temperature" in user_error(capsys, ["sample", trained_run, "--temperature", -0.5])
    assert "more than the sequence length" in user_error(capsys, ["sample", trained_run, "--prompt", "x" * 40])
    assert "outside" in user_error(capsys, ["sample", trained_run, "--infill", "caf\u00e9 ___"])
    assert "outside" in user_error(capsys, ["sample", trained_run, "--prompt", "R2D2"])
    assert "not both" in user_error(capsys, ["sample", trained_run, "--prompt", "a", "--infill", "b_"])
    assert "block" in user_error(capsys, ["sample", trained_run, "--block", 64])
    assert ".html" in user_error(capsys, ["sample", trained_run, "--trace", tmp_path / "trace.txt"])
    assert not (tmp_path / "trace.txt").exists()
