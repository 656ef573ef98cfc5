"""Tests for run folders as a user meets them: the time budget (learning-rate schedule, stop, resume),
one writer per folder (an OS lock), resuming with the run's own config.yaml, OS errors while writing
(one sentence, exit 2, nothing changed), and a NaN loss during a resume (nothing rewritten)."""

import errno
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import SafetensorError

import md4.train
from md4 import checkpoint
from md4.cli import main
from md4.config import RESUME_KEYS, TrainConfig, load_config
from md4.diffusion import MD4
from md4.errors import UserError
from md4.train import lr_at, planned_steps, train

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
sys.path.insert(0, str(TESTS))
from test_cli import run_copy, snapshot, user_error  # noqa: E402, F401  (run_copy: a fixture)
import md4proc  # noqa: E402
from md4proc import logged_step  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def rewind(run: Path) -> Path:
    """As if killed just before its last checkpoint: checkpoint 15 is the newest, no model yet."""
    shutil.rmtree(run / "checkpoints" / "step_00000020")
    shutil.rmtree(run / "model")
    return run


class FakeClock:
    """md4.train.clock that moves `tick` seconds at each reading: training reads it once at the start
    and once per step, so step s ends at elapsed s * tick."""

    def __init__(self, tick: float, start: float = 0.0):
        self.tick, self.now = tick, start - tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


# ---- the time budget ----------------------------------------------------------------------------


def test_lr_follows_the_larger_of_step_and_time_progress():
    cfg = TrainConfig(steps=1000, lr=2e-3, warmup=10, min_lr_ratio=0.1, max_minutes=1.0)  # a 60 s budget
    floor = 0.1 * 2e-3

    def cosine(p):
        return floor + (2e-3 - floor) * 0.5 * (1 + math.cos(math.pi * p))

    # a slow machine: at step 100, 30 s in (warm-up took 6 s), time is further along than steps
    assert lr_at(100, cfg, elapsed=30.0, warmup_elapsed=6.0) == pytest.approx(cosine(24 / 54), rel=1e-12)
    # a fast machine: at step 900, 10 s in, steps are further along
    assert lr_at(900, cfg, elapsed=10.0, warmup_elapsed=1.0) == pytest.approx(cosine(890 / 990), rel=1e-12)
    # the floor when the budget is spent, and after it
    assert lr_at(200, cfg, elapsed=60.0, warmup_elapsed=6.0) == pytest.approx(floor, rel=1e-12)
    assert lr_at(200, cfg, elapsed=75.0, warmup_elapsed=6.0) == pytest.approx(floor, rel=1e-12)
    # the warm-up stays in steps, and the decay starts at the peak whenever it ended
    assert lr_at(4, cfg, elapsed=50.0) == pytest.approx(2e-3 * 5 / 10)
    assert lr_at(10, cfg, elapsed=20.0, warmup_elapsed=20.0) == pytest.approx(2e-3)
    # without a budget the time is ignored: the step schedule as before
    plain = TrainConfig(steps=1000, lr=2e-3, warmup=10, min_lr_ratio=0.1)
    assert [lr_at(s, plain, elapsed=1e9) for s in range(0, 1001, 37)] == [lr_at(s, plain) for s in range(0, 1001, 37)]
    # along a clock at 0.5 s per step (the budget ends at step 120): never up after warm-up, floor at the end
    lrs = [lr_at(s, cfg, elapsed=0.5 * s, warmup_elapsed=5.0) for s in range(10, 121)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(floor, rel=1e-12)


def test_the_progress_bar_counts_to_where_the_budget_ends():
    cfg = TrainConfig(steps=1600, max_minutes=13.0)  # 780 s
    assert planned_steps(100, cfg, elapsed=240.0, rate=0.4) == 100 + math.ceil(540 * 0.4)  # 316, not 1600
    assert planned_steps(100, cfg, elapsed=10.0, rate=100.0) == 1600  # fast enough: the step count ends it
    assert planned_steps(300, cfg, elapsed=790.0, rate=0.4) == 300  # past the budget: it ends here
    assert planned_steps(5, TrainConfig(steps=50), elapsed=1e6, rate=0.1) == 50  # no budget


def test_a_run_with_a_time_budget_decays_stops_and_resumes_with_its_time(tmp_path, corpus, monkeypatch):
    """Step s ends at 0.5 s * s; the 15 s budget ends at step 30 of 1000 with the decay complete.
    A copy resumed from step 15 with a clock that reads 1000 s counts the 7.5 s already spent."""
    sets = [f"data.corpus={corpus}", "train.steps=1000", "train.max_minutes=0.25", "train.min_lr_ratio=0.1",
            "train.lr=1e-3", "train.warmup=5", "train.log_every=1", "train.eval_every=1000", "train.ckpt_every=15"]
    cfg = load_config("tiny", sets)
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    monkeypatch.setattr(md4.train, "clock", FakeClock(0.5))
    train(cfg, run, progress=False)
    recs = [r for r in records(run) if "lr" in r]
    assert [r["step"] for r in recs] == list(range(1, 31))
    assert [r["seconds"] for r in recs] == [0.5 * s for s in range(1, 31)]
    # step s (logged as s + 1) ran with the lr of its start: 0.5 s * s in, the warm-up ended 2.5 s in
    assert [r["lr"] for r in recs] == [lr_at(s, cfg.train, 0.5 * s, 2.5) for s in range(30)]
    assert recs[-1]["lr"] == pytest.approx(1e-4, rel=0.04)  # the floor, at the budget's end
    assert lr_at(29, cfg.train) > 0.99e-3  # where the step schedule alone would still be
    state = json.loads((run / "checkpoints" / "step_00000015" / "state.json").read_text())
    assert (state["elapsed"], state["warmup_elapsed"]) == (7.5, 2.5)

    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step_00000015", resumed / "checkpoints" / "step_00000015")
    shutil.copy(run / "config.yaml", resumed / "config.yaml")
    monkeypatch.setattr(md4.train, "clock", FakeClock(0.5, start=1000.0))
    train(cfg, resumed, progress=False)
    assert records(resumed) == [r for r in records(run) if r["step"] > 15]  # same steps, lrs, losses, times
    assert (resumed / "model" / "model.safetensors").read_bytes() == (run / "model" / "model.safetensors").read_bytes()

    # resumed again once the budget is spent: nothing more is trained
    before = snapshot(resumed / "checkpoints")
    train(cfg, resumed, progress=False)
    assert snapshot(resumed / "checkpoints") == before


# ---- one writer per run folder ------------------------------------------------------------------


def test_a_second_writer_is_refused_and_the_first_keeps_its_history(tmp_path, corpus, capsys):
    """`md4 train` runs in a process of its own; a second `md4 train --out SAME` (this process) exits 2 at once,
    and the first keeps logging every step to the same metrics.jsonl."""
    run = tmp_path / "run"
    argv = ["train", "--config", "tiny", "--out", str(run), "--quiet", "--set", f"data.corpus={corpus}",
            "--set", "train.steps=100000", "--set", "train.ckpt_every=3", "--set", "train.eval_every=100000"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    first = md4proc.start(argv, env)  # forked with torch and md4 imported (tests/md4proc.py)
    try:
        def wait_for(step: int) -> None:
            end = time.time() + 120
            while logged_step(run) < step:
                assert first.poll() is None and time.time() < end, first.communicate()[1][-2000:]
                time.sleep(0.01)

        wait_for(4)
        before = logged_step(run)
        msg = user_error(capsys, [*argv, "--set", "train.steps=6"])  # (would end soon if it were let in)
        assert "being written by another md4 process" in msg and str(run) in msg
        wait_for(before + 2)  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    steps = [r["step"] for r in records(run)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= before + 2  # every step, once


def test_the_lock_is_the_run_folders_and_dies_with_its_holder(tmp_path, run_copy, capsys):
    before = snapshot(run_copy)
    fd = checkpoint.lock_run(run_copy)  # as another process would hold it
    try:
        assert "being written by another md4 process" in user_error(capsys, ["train", "--out", run_copy, "--quiet"])
        with pytest.raises(UserError, match="another md4 process"):
            train(load_config(str(run_copy / "config.yaml")), run_copy, progress=False)
    finally:
        os.close(fd)
    assert snapshot(run_copy) == before
    assert main(["train", "--out", str(run_copy), "--quiet"]) == 0  # released: the finished run resumes


def test_debris_of_dead_writers_is_removed_under_the_lock(tmp_path, run_copy):
    rewind(run_copy)
    debris = [run_copy / "checkpoints" / ".tmp_step_00000020.4242", run_copy / ".model.tmp4242",
              run_copy / ".config.yaml.tmp4242", run_copy / "checkpoints" / ".tmp_step_00000020"]
    for p in debris:
        p.mkdir() if "step" in p.name or "model" in p.name else p.write_text("half")
    assert main(["train", "--out", str(run_copy), "--quiet"]) == 0
    assert not any(p.exists() for p in debris)
    assert sorted(p.name for p in run_copy.iterdir() if p.name.startswith(".")) == [".lock"]


# ---- resume with the run's own config -----------------------------------------------------------


def test_resume_without_options_uses_the_runs_config(run_copy, trained_run):
    """The run was made with --config tiny --set data.corpus=...: `md4 train --out RUN` continues it as such
    (it used to take the demo preset), and ends exactly where the uninterrupted run ended."""
    rewind(run_copy)
    config = (run_copy / "config.yaml").read_bytes()
    assert main(["train", "--out", str(run_copy), "--quiet"]) == 0
    assert (run_copy / "model" / "model.safetensors").read_bytes() == \
        (trained_run / "model" / "model.safetensors").read_bytes()
    assert (run_copy / "config.yaml").read_bytes() == config
    assert [r["step"] for r in records(run_copy) if "loss_bpc" in r] == list(range(1, 21))


def test_a_new_run_without_config_takes_the_demo_preset(tmp_path, run_copy, monkeypatch):
    asked = []
    monkeypatch.setattr(md4.train, "train", lambda cfg, out, progress=True: asked.append(cfg))
    assert main(["train", "--out", str(tmp_path / "new")]) == 0
    assert main(["train", "--out", str(run_copy), "--set", "train.steps=30"]) == 0
    saved = load_config(str(run_copy / "config.yaml"))
    assert asked[0] == load_config("demo")
    assert asked[1] == load_config(str(run_copy / "config.yaml"), ["train.steps=30"]) != saved


def test_resume_with_more_steps_extends_the_run(run_copy):
    saved = yaml.safe_load((run_copy / "config.yaml").read_text())
    assert main(["train", "--out", str(run_copy), "--set", "train.steps=30", "--quiet"]) == 0
    assert yaml.safe_load((run_copy / "config.yaml").read_text()) == {**saved, "train": {**saved["train"], "steps": 30}}
    recs = [r for r in records(run_copy) if "loss_bpc" in r]
    assert [r["step"] for r in recs] == list(range(1, 31))
    tc = load_config(str(run_copy / "config.yaml")).train
    assert [r["lr"] for r in recs[20:]] == [lr_at(s, tc) for s in range(20, 30)]  # decaying to the new end
    assert [p.name for p in checkpoint.checkpoints(run_copy)] == ["step_00000025", "step_00000030"]
    assert json.loads((run_copy / "model" / "config.json").read_text())["config"]["train"]["steps"] == 30


def test_resume_on_another_kind_of_device_reseeds_the_noise(tmp_path, run_copy):
    """A checkpoint written on a GPU (a 16-byte CUDA generator state) resumes on the CPU, whose generator
    state differs in kind: the noise generator is seeded from the saved bytes, so twice gives the same run."""
    import base64

    rewind(run_copy)
    path = run_copy / "checkpoints" / "step_00000015" / "state.json"
    state = json.loads(path.read_text())
    state.update(noise_rng=base64.b64encode(bytes(range(16))).decode(), noise_device="cuda")
    path.write_text(json.dumps(state))
    again = tmp_path / "again"
    shutil.copytree(run_copy, again)
    for run in (run_copy, again):
        assert main(["train", "--out", str(run), "--quiet"]) == 0
    assert (run_copy / "model" / "model.safetensors").read_bytes() == (again / "model" / "model.safetensors").read_bytes()
    assert json.loads((checkpoint.checkpoints(run_copy)[-1] / "state.json").read_text())["noise_device"] == "cpu"


@pytest.mark.parametrize("options, keys", [
    (["--set", "train.lr=0.01"], ["train.lr"]),
    (["--set", "model.dim=64", "--set", "train.seed=3"], ["model.dim", "train.seed"]),
    (["--config", "tiny"], ["data.corpus"]),  # the case: the original --set options left out
    (["--set", "diffusion=genmd4", "--set", "model.time_cond=true"], ["method", "model.time_cond"]),
])
def test_resume_with_a_different_config_is_refused_naming_the_keys(run_copy, capsys, options, keys):
    before = snapshot(run_copy)
    msg = user_error(capsys, ["train", "--out", run_copy, *options, "--quiet"])
    named = msg.split("; a resume may change only")[0]
    assert all(k in named for k in keys) and "config.yaml" in named and "train.steps" not in named
    assert snapshot(run_copy) == before


def test_resume_below_the_step_reached_is_refused(run_copy, capsys):
    before = snapshot(run_copy)
    msg = user_error(capsys, ["train", "--out", run_copy, "--set", "train.steps=10", "--quiet"])
    assert "step 20" in msg and "train.steps" in msg
    assert snapshot(run_copy) == before


def test_keys_that_may_change_on_resume_are_documented():
    runs = (TESTS.parent / "README.md").read_text().split("**Runs.**")[1].split("\n\n")[0]
    for key in RESUME_KEYS:
        assert f"`{key}`" in runs or (key.startswith("sample.") and "`sample.*`" in runs), key
    assert set(RESUME_KEYS) <= {f"{s}.{k}" for s, d in load_config("tiny").to_dict().items() if isinstance(d, dict)
                                for k in d}


# ---- OS errors while writing --------------------------------------------------------------------


def no_space_in_safetensors(monkeypatch):
    def save_file(tensors, path):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(checkpoint, "save_file", save_file)
    return "No space left on device", "model.safetensors"


def no_space_in_torch_save(monkeypatch):
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *args, **kw):
        f = real_open(path, mode, *args, **kw)
        return Full(f) if str(path).endswith("optim.pt") else f
    monkeypatch.setattr(checkpoint, "open", fake_open, raising=False)
    return "No space left on device", "optim.pt"


def read_only_renames(monkeypatch):
    def replace(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(src))
    monkeypatch.setattr(os, "replace", replace)
    return "Read-only file system", ".tmp"


def read_only_folder(monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    return "not writable", "run"


@pytest.mark.parametrize("fault", [no_space_in_safetensors, no_space_in_torch_save, read_only_renames,
                                   read_only_folder])
def test_os_errors_while_writing_are_one_sentence_and_change_nothing(run_copy, capsys, monkeypatch, fault):
    """Extending the finished run fails at its first checkpoint (step 25): exit 2, one sentence naming the
    cause and the file, every file as it was (config.yaml not yet rewritten), no temporary left behind."""
    before = snapshot(run_copy)
    words = fault(monkeypatch)
    msg = user_error(capsys, ["train", "--out", run_copy, "--set", "train.steps=30", "--quiet"])
    monkeypatch.undo()
    assert all(w in msg for w in words), msg
    assert snapshot(run_copy) == before


def test_out_naming_an_existing_file(tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    assert "existing file" in user_error(capsys, ["train", "--config", "tiny", "--out", out, "--quiet"])
    assert "Not a directory" in user_error(capsys, ["train", "--config", "tiny", "--out", out / "run", "--quiet"])
    assert out.read_text() == "mine" and list(tmp_path.iterdir()) == [out]


def test_a_new_run_that_fails_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "runs" / "new"
    assert "missing.txt" in user_error(capsys, ["train", "--config", "tiny", "--out", out,
                                                "--set", f"data.corpus={tmp_path / 'missing.txt'}", "--quiet"])
    assert list(tmp_path.iterdir()) == []


# ---- a NaN loss during a resume -----------------------------------------------------------------


def test_nan_during_a_resume_rewrites_nothing(run_copy, capsys, monkeypatch):
    """Resumed from step 15 with more steps, the loss is NaN at once: config.yaml (which would record
    the new steps) and metrics.jsonl (which would drop steps 16-20) are left as they were."""
    rewind(run_copy)
    before = snapshot(run_copy)
    monkeypatch.setattr(MD4, "loss", lambda self, net, x0, **kw: torch.full((), math.nan, requires_grad=True))
    msg = user_error(capsys, ["train", "--out", run_copy, "--set", "train.steps=40", "--quiet"])
    assert "loss became nan at step 16" in msg
    assert snapshot(run_copy) == before
