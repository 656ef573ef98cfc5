"""Tests for md4.train: the lr schedule, exact resume (after SIGKILL, at any moment), stale temporary
checkpoints, and that training actually learns."""

import json
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from md4 import checkpoint
from md4.config import TrainConfig, load_config
from md4.train import lr_at, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
import md4proc  # noqa: E402
from md4proc import logged_step  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models run fastest on one thread, and a busy machine cannot oversubscribe it
    (conftest.py restores torch's thread count after each test)."""
    torch.set_num_threads(1)

# ---- learning-rate schedule -------------------------------------------------------------------


def test_lr_warmup_is_linear_then_cosine_to_the_floor():
    cfg = TrainConfig(steps=1000, lr=2e-3, warmup=100, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(cfg.steps + 1)]
    # warm-up: lr * (s + 1) / warmup, reaching lr at the end of warm-up
    for s in range(cfg.warmup):
        assert lrs[s] == pytest.approx(cfg.lr * (s + 1) / cfg.warmup)
    assert lrs[0] > 0
    assert lrs[cfg.warmup] == pytest.approx(cfg.lr)
    # halfway through the decay: the midpoint of lr and the floor
    mid = cfg.warmup + (cfg.steps - cfg.warmup) // 2
    assert lrs[mid] == pytest.approx(0.5 * (cfg.lr + 0.1 * cfg.lr))
    # the exact cosine in between
    s = 700
    progress = (s - cfg.warmup) / (cfg.steps - cfg.warmup)
    assert lrs[s] == pytest.approx(0.2e-3 + 1.8e-3 * 0.5 * (1 + math.cos(math.pi * progress)))
    # the floor at the last step, and never below it
    assert lrs[cfg.steps] == pytest.approx(cfg.min_lr_ratio * cfg.lr)
    assert min(lrs[cfg.warmup :]) >= cfg.min_lr_ratio * cfg.lr * (1 - 1e-12)
    # monotone: increasing during warm-up, non-increasing after it
    assert all(a < b for a, b in zip(lrs[: cfg.warmup - 1], lrs[1 : cfg.warmup]))
    assert lrs[cfg.warmup - 1] == lrs[cfg.warmup] == cfg.lr  # the peak: last warm-up step and first decay step
    assert all(a >= b for a, b in zip(lrs[cfg.warmup :], lrs[cfg.warmup + 1 :]))
    assert max(lrs) == pytest.approx(cfg.lr)


def test_lr_without_warmup_and_zero_floor():
    cfg = TrainConfig(steps=50, lr=1e-3, warmup=0, min_lr_ratio=0.0)
    assert lr_at(0, cfg) == pytest.approx(1e-3)
    assert lr_at(50, cfg) == pytest.approx(0.0, abs=1e-15)
    assert lr_at(60, cfg) == pytest.approx(0.0, abs=1e-15)  # past the end: stays at the floor
    lrs = [lr_at(s, cfg) for s in range(51)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


# ---- helpers ----------------------------------------------------------------------------------

DETERMINISTIC_KEYS = ("loss_bpc", "grad_norm", "lr", "valid_bpc")  # everything but wall-clock seconds
CLOCK_STATE = ("elapsed", "warmup_elapsed")  # training time in state.json: wall clock too


def read_state(ck: Path) -> dict:
    """A checkpoint's state.json without the wall-clock fields."""
    return {k: v for k, v in json.loads((ck / "state.json").read_text()).items() if k not in CLOCK_STATE}


def read_metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field."""
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k == "step" or k in DETERMINISTIC_KEYS} for r in recs]


def tensors(path: Path) -> dict:
    return load_file(str(path))


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), f"{a.name}: {k} differs"


def assert_same_run(ref: Path, run: Path) -> None:
    """Same logged losses, bit-identical final model and last checkpoint (model, EMA, AdamW, RNG state)."""
    assert read_metrics(run) == read_metrics(ref)
    assert (run / "model" / "model.safetensors").read_bytes() == (ref / "model" / "model.safetensors").read_bytes()
    assert json.loads((run / "model" / "config.json").read_text()) == json.loads((ref / "model" / "config.json").read_text())
    ref_ck, run_ck = checkpoint.checkpoints(ref), checkpoint.checkpoints(run)
    last_ref, last_run = ref_ck[-1], run_ck[-1]
    assert last_run.name == last_ref.name
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_tensors(last_ref / name, last_run / name)
    assert read_state(last_run) == read_state(last_ref)
    o_ref, o_run = (torch.load(p / "optim.pt", weights_only=True) for p in (last_ref, last_run))
    for k, s in o_ref["state"].items():
        for name, v in s.items():
            assert torch.equal(v, o_run["state"][k][name]), f"optimizer {name} of param {k} differs"


def overrides(corpus: Path, **train) -> list[str]:
    return [f"data.corpus={corpus}"] + [f"train.{k}={v}" for k, v in train.items()]


# ---- exact resume after SIGKILL (processes) ---------------------------------------------------


def md4_train(run: Path, sets: list[str]) -> md4proc.Proc:
    """`md4 train --config tiny` in a process of its own (forked with torch and md4 imported)."""
    argv = ["train", "--config", "tiny", "--out", str(run), "--quiet"]
    for s in sets:
        argv += ["--set", s]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MD4_DATA", None)
    return md4proc.start(argv, env)


def finish(proc: md4proc.Proc, timeout: float = 180) -> None:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def wait_until(cond, proc: md4proc.Proc, timeout: float = 120) -> bool:
    """Poll cond() every millisecond or so; False if the process ended first."""
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return cond()
        time.sleep(0.001)
    raise AssertionError("timed out waiting for the training process")


def test_exact_resume_after_sigkill(tmp_path, corpus):
    """Kill `md4 train` with SIGKILL several times (mid-step, mid-checkpoint-write, mid-model-save), resume
    each time on the same folder: the losses and the weights are bit-identical to an uninterrupted run.

    The killed run changes train.ckpt_every between restarts (how often state is saved must not change
    the result), so it replays several steps from an older checkpoint after some kills and none after
    others. The reference runs concurrently to save wall time."""
    steps = 80
    common = overrides(corpus, steps=steps, eval_every=20, log_every=1, keep=2)
    ref, run = tmp_path / "ref", tmp_path / "killed"
    ref_proc = md4_train(ref, common + ["train.ckpt_every=7"])
    rng = random.Random(1234)
    ckpt_dir = run / "checkpoints"

    def tmp_ckpt():
        return ckpt_dir.is_dir() and any(p.name.startswith(".tmp_step_") for p in ckpt_dir.iterdir())

    def tmp_model():
        return any(p.name.startswith(".model.tmp") for p in run.iterdir())

    # (ckpt_every for this segment, kill once this step is logged, where the kill should land)
    plan = [
        (7, 12 + rng.randrange(6), "step"),  # mid-step, after a random delay
        (1, 35 + rng.randrange(6), "checkpoint"),  # while a .tmp_step_* folder is being written
        (5, 57 + rng.randrange(6), "step"),
        (7, steps, "model"),  # while the final model folder is being written
    ]
    mid_run_kills, resumed_from, left_tmp = 0, [], []
    for ckpt_every, target, where in plan:
        # A kill aimed at a checkpoint write can land just after the rename on a loaded machine;
        # then that segment is tried again a couple of steps later (at most 5 times).
        for attempt in range(5 if where == "checkpoint" else 1):
            before = checkpoint.checkpoints(run)
            resumed_from.append(int(before[-1].name.split("_")[1]) if before else 0)
            proc = md4_train(run, common + [f"train.ckpt_every={ckpt_every}"])
            writing = {"step": lambda: True, "checkpoint": tmp_ckpt, "model": tmp_model}[where]
            goal = target if attempt == 0 else logged_step(run) + 2
            wait_until(lambda: logged_step(run) >= goal and writing(), proc)
            if where == "step":
                time.sleep(rng.uniform(0, 0.03))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate(timeout=60)
            assert proc.returncode in (0, -signal.SIGKILL), err  # a resume that failed is not a kill
            if proc.returncode == -signal.SIGKILL:
                assert not (run / "model" / "model.safetensors").exists()  # killed before it finished
                mid_run_kills += 1
            left_tmp.append(tmp_ckpt() or tmp_model())
            if left_tmp[-1]:
                break
    # a final uninterrupted resume finishes the run
    resumed_from.append(int(checkpoint.checkpoints(run)[-1].name.split("_")[1]))
    finish(md4_train(run, common + ["train.ckpt_every=7"]))
    finish(ref_proc)

    # not vacuous: the run really was killed mid-training and resumed from intermediate checkpoints
    assert mid_run_kills >= 3, (mid_run_kills, resumed_from)
    assert sum(0 < s < steps for s in resumed_from) >= 2, resumed_from
    assert resumed_from == sorted(resumed_from)
    assert any(left_tmp), "no kill landed during a checkpoint or model write"
    # exactness
    assert_same_run(ref, run)
    metrics = read_metrics(run)
    assert [r["step"] for r in metrics if "loss_bpc" in r] == list(range(1, steps + 1))  # each step once
    assert [r["step"] for r in metrics if "valid_bpc" in r] == [20, 40, 60, 80]
    # debris of the kills is gone, only the last `keep` checkpoints are left
    assert not list(ckpt_dir.glob(".tmp_step_*"))
    assert [p.name for p in checkpoint.checkpoints(run)] == ["step_00000077", "step_00000080"]


# ---- resume, in process -----------------------------------------------------------------------


def test_resume_between_log_steps_logs_the_same_means(tmp_path, corpus):
    """A checkpoint that falls between two log steps (ckpt_every=3, log_every=4) carries the running
    loss and gradient-norm sums, so the resumed run logs exactly the same averages."""
    sets = overrides(corpus, steps=12, log_every=4, ckpt_every=3, keep=0, eval_every=6)
    ref, run = tmp_path / "ref", tmp_path / "resumed"
    train(load_config("tiny", sets), ref, progress=False)
    assert [p.name for p in checkpoint.checkpoints(ref)] == [f"step_{s:08d}" for s in (3, 6, 9, 12)]
    for resume_at in (3, 6, 9):  # as if killed right after writing checkpoint `resume_at`
        shutil.rmtree(run, ignore_errors=True)
        (run / "checkpoints").mkdir(parents=True)
        shutil.copytree(ref / "checkpoints" / f"step_{resume_at:08d}", run / "checkpoints" / f"step_{resume_at:08d}")
        # a metrics.jsonl that ran ahead of the checkpoint, with a half-written last line
        lines = (ref / "metrics.jsonl").read_text().splitlines()
        (run / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
        train(load_config("tiny", sets), run, progress=False)
        assert_same_run(ref, run)


def test_stale_tmp_checkpoint_is_ignored_and_removed(tmp_path, corpus):
    """A `.tmp_step_*` folder with a partial file (a kill mid-write) is never loaded, and is cleaned up."""
    sets = overrides(corpus, steps=10, ckpt_every=5, keep=0, eval_every=5)
    ref, run = tmp_path / "ref", tmp_path / "run"
    train(load_config("tiny", sets), ref, progress=False)

    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "step_00000005", run / "checkpoints" / "step_00000005")
    shutil.copy(ref / "metrics.jsonl", run / "metrics.jsonl")  # it ran ahead of the checkpoint
    stale = run / "checkpoints" / ".tmp_step_00000010"
    stale.mkdir()
    whole = (ref / "checkpoints" / "step_00000010" / "model.safetensors").read_bytes()
    (stale / "model.safetensors").write_bytes(whole[: len(whole) // 2])
    # the stale folder is not a checkpoint
    assert [p.name for p in checkpoint.checkpoints(run)] == ["step_00000005"]

    train(load_config("tiny", sets), run, progress=False)
    assert not stale.exists()
    assert not list((run / "checkpoints").glob(".*"))
    assert_same_run(ref, run)


def test_resume_of_a_finished_run_changes_nothing(tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    cfg = load_config(str(run / "config.yaml"))
    before = {p: p.read_bytes() for p in (run / "model").iterdir()}
    train(cfg, run, progress=False)
    assert {p: p.read_bytes() for p in (run / "model").iterdir()} == before
    assert read_metrics(run) == read_metrics(trained_run)


# ---- learning ---------------------------------------------------------------------------------


def test_training_learns_a_predictable_corpus(tmp_path):
    """On a 20-character phrase repeated, a short run gets far below the 4.75 bits of a uniform guess."""
    text = tmp_path / "phrase.txt"
    text.write_text("the quick brown fox " * 3000)
    run = tmp_path / "run"
    cfg = load_config("tiny", overrides(text, steps=300, lr="1e-2", warmup=10, eval_every=100, ckpt_every=300))
    train(cfg, run, progress=False)
    metrics = read_metrics(run)
    valid = [r["valid_bpc"] for r in metrics if "valid_bpc" in r]
    losses = [r["loss_bpc"] for r in metrics if "loss_bpc" in r]
    assert math.log2(27) == pytest.approx(4.755, abs=1e-3)
    assert valid[-1] < 1.0, valid  # about 0.44 bits per character with these settings
    assert valid == sorted(valid, reverse=True)  # EMA weights improve at every evaluation
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
