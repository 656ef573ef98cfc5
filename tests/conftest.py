"""Shared fixtures: a generated English-like corpus and one finished `tiny` run (no ../shared/data)."""

import random
from pathlib import Path

import pytest
import torch

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have "
    "an they you were her she there one all we their been has when who will more no if out so said what up "
    "its about into than them can only other new some could time these two may then do first any my now such "
    "like our over man me even most made after also did many before must through back years where much your way"
).split()


def english_like(n_words: int, seed: int = 0) -> str:
    """Deterministic pseudo-English: seeded random words, capitalized sentences, punctuation, line breaks."""
    rng = random.Random(seed)
    out, sentence = [], []
    for _ in range(n_words):
        sentence.append(rng.choice(WORDS))
        if len(sentence) >= rng.randint(5, 14):
            out.append(sentence[0].capitalize() + " " + " ".join(sentence[1:]) + rng.choice([".", ",", "!", "?", ".\n"]))
            sentence = []
    return " ".join(out) + "\n"


@pytest.fixture(autouse=True)
def restore_torch_globals():
    """Training sets torch's thread count and deterministic mode process-wide; undo it after each test."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A ~230 KB English-like text file (about 210k characters once normalized)."""
    path = tmp_path_factory.mktemp("corpus") / "english.txt"
    path.write_text(english_like(45_000))
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, corpus):
    """A finished `tiny` run folder (20 steps, checkpoints every 5, keep 2), trained once per session.
    Tests that damage it must work on a copy (shutil.copytree)."""
    from md4.cli import main

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    run = tmp_path_factory.mktemp("runs") / "tiny"
    try:
        assert main(["train", "--config", "tiny", "--out", str(run), "--set", f"data.corpus={corpus}", "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return run


@pytest.fixture(scope="module")
def one_thread():
    """Many tiny tensor ops: a second intra-op thread only adds contention on a 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def bench_script(capsys):
    """Run a bench/ script's main(argv) in this process (its imports are done: torch alone is ~2 CPU-seconds
    per process): bench_script(path, *argv) -> (exit status, stdout, stderr), SystemExit as a process's."""
    import importlib.util
    import sys

    def run(path, *argv):
        spec = importlib.util.spec_from_file_location(f"bench_{Path(path).stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(Path(path).parent))
        try:
            spec.loader.exec_module(module)
            capsys.readouterr()
            try:
                code = module.main(list(map(str, argv)))
            except SystemExit as e:
                code = e.code
        finally:
            sys.path.remove(str(Path(path).parent))
        out, err = capsys.readouterr()
        if isinstance(code, str):  # sys.exit("message"): the message on stderr, status 1
            code, err = 1, err + code + "\n"
        return code or 0, out, err

    return run
