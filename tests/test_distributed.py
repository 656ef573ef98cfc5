"""Tests for md4.distributed on CPU with the gloo backend and 2 processes under torchrun:
one step's loss and gradients equal one process's on the same global batch (DDP and FSDP2),
whole runs match one process, and a 2-process run killed with SIGKILL resumes exactly.

torchrun itself runs once (the DDP test's uninterrupted run); the other jobs are the 2 processes
torchrun would start (its environment for each rank: tests/md4proc.py), forked from a server that
has imported torch and md4, so that a job starts in milliseconds instead of ~10 CPU-seconds of
imports. The DDP job killed and resumed that way must end bit-identical to the torchrun job."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from md4 import checkpoint
from md4.config import load_config
from md4.data import draw_batch, random_crops
from md4.distributed import chunk_seed
from md4.errors import UserError
from md4.guidance import with_labels
from md4.train import train

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
sys.path.insert(0, str(TESTS))
import dist_step_worker as worker  # noqa: E402
import md4proc  # noqa: E402
from md4proc import logged_step  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def env() -> dict:
    e = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
         "PYTHONUNBUFFERED": "1"}
    e.pop("MD4_DATA", None)
    return e


def torchrun(*args: str, **kw) -> subprocess.Popen:
    """2 processes on this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            **kw)


def finish(*procs, timeout: float = 240) -> None:
    """Wait for a torchrun job (or the processes of a job) to end; each must succeed."""
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err[-3000:]


def ranks(run: Path, sets: list[str]) -> list[md4proc.Proc]:
    """The 2 processes `torchrun(*train_args(run, sets))` starts, without torchrun."""
    return md4proc.ranks(train_args(run, sets)[2:], 2, env())


def train_args(run: Path, sets: list[str]) -> list[str]:
    args = ["-m", "md4", "train", "--config", "tiny", "--out", str(run), "--quiet"]
    for s in sets:
        args += ["--set", s]
    return args


def metrics(run: Path) -> list[dict]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in recs]


def weights(run: Path) -> dict:
    return load_file(str(run / "model" / "model.safetensors"))


def assert_close_runs(a: Path, b: Path) -> None:
    """Same steps logged, losses, gradient norms and valid bpc equal up to float rounding (which AdamW
    amplifies a little over the steps), and close weights."""
    ma, mb = metrics(a), metrics(b)
    assert [sorted(r) for r in ma] == [sorted(r) for r in mb] and [r["step"] for r in ma] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb):
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=2e-3, abs=1e-5), (ra["step"], k)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-2, atol=1e-4)


def assert_same_run(a: Path, b: Path) -> None:
    assert metrics(a) == metrics(b)
    assert (a / "model" / "model.safetensors").read_bytes() == (b / "model" / "model.safetensors").read_bytes()


# ---- one step: 2 ranks == 1 process on the same global batch -----------------------------------------


def test_one_step_loss_and_gradients_equal_one_process(tmp_path):
    """DDP and FSDP2 (2 ranks, 2 micro-batches each, dropout on): the global-batch loss, the gradient norm and
    every gradient equal those of one process computing the 4 chunks by hand (md4.distributed.chunk_seed).
    Two cases: MD4 on a token stream, and a class-conditional GenMD4 (its learnable schedule stays
    replicated under FSDP; two draws per sequence) on labelled rows, as images, with label dropout."""
    finish(*md4proc.ranks([str(tmp_path)], 2, env(), script=TESTS / "dist_step_worker.py"))
    torch.use_deterministic_algorithms(True)
    for suffix in ("", "_labels"):
        if suffix:
            model = worker.build_labelled().train()
            x0, y = draw_batch(worker.Rows(), worker.B, worker.N, torch.Generator().manual_seed(1), labels=True,
                               label_dropout=worker.DROPOUT, null_label=worker.CLASSES)
            assert (y == worker.CLASSES).any() and (y < worker.CLASSES).any()  # some labels dropped, not all
            labels = y.split(worker.MICRO)
        else:
            model = worker.build().train()
            x0 = random_crops(worker.data(), worker.B, worker.N, torch.Generator().manual_seed(1))
            labels = [None] * (worker.B // worker.MICRO)
        losses = []
        for k, (xk, yk) in enumerate(zip(x0.split(worker.MICRO), labels)):
            s = chunk_seed(worker.SEED, worker.STEP, k)
            torch.manual_seed(s + 1)
            denoiser = with_labels(model.net, yk)
            losses.append(model.method.loss(denoiser, xk, generator=torch.Generator().manual_seed(s)) / worker.N)
        ref = torch.stack(losses).mean()
        ref.backward()
        ref_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        for mode in ("ddp", "fsdp"):
            r = torch.load(tmp_path / f"{mode}{suffix}.pt", weights_only=True)
            assert r["world"] == 2
            assert r["loss"].item() == pytest.approx(ref.item(), rel=1e-6)
            assert r["gnorm"].item() == pytest.approx(ref_norm.item(), rel=1e-5)
            for name, p in model.named_parameters():
                torch.testing.assert_close(r["grads"][name], p.grad, rtol=1e-5, atol=1e-7, msg=f"{mode}{suffix}: {name}")
        assert len(losses) == 4 and len({round(v.item(), 6) for v in losses}) == 4  # four distinct chunks


# ---- whole runs under torchrun -------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_run_matches_one_process_and_resumes_exactly_after_sigkill(tmp_path, corpus):
    """`torchrun -m md4 train` with DDP: (1) uninterrupted, it logs the losses and ends with the weights of one
    process with the same micro-batch; (2) the same job (its 2 processes, as torchrun starts them) killed with
    SIGKILL (every process at once) twice mid-run and restarted on the same folder ends bit-identical to the
    uninterrupted torchrun job."""
    sets = [f"data.corpus={corpus}", "train.steps=36", "train.batch_size=8", "train.micro_batch=2",
            "train.log_every=1", "train.eval_every=20", "train.ckpt_every=4", "model.dropout=0.1"]
    ref, killed, single = tmp_path / "ref", tmp_path / "killed", tmp_path / "single"
    finish(torchrun(*train_args(ref, sets)))
    resumed_from = []
    for target in (8, 20):
        found = checkpoint.checkpoints(killed)
        resumed_from.append(int(found[-1].name.split("_")[1]) if found else 0)
        job = ranks(killed, sets)
        end = time.time() + 120
        while logged_step(killed) < target and all(p.poll() is None for p in job) and time.time() < end:
            time.sleep(0.005)
        alive = [p.poll() is None for p in job]
        for p in job:  # every process of the job at once, as a crashed node would be
            p.kill()
        errs = [p.communicate(timeout=60)[1] for p in job]
        assert all(alive), errs[alive.index(False)][-2000:]
        assert not (killed / "model").exists()
    resumed_from.append(int(checkpoint.checkpoints(killed)[-1].name.split("_")[1]))
    finish(*ranks(killed, sets))
    assert resumed_from[0] == 0 and 0 < resumed_from[1] < resumed_from[2] < 36, resumed_from
    assert_same_run(ref, killed)
    assert [r["step"] for r in metrics(killed) if "loss_bpc" in r] == list(range(1, 37))

    train(load_config("tiny", sets), single, progress=False)  # one process, 4 micro-batches per step
    assert_close_runs(ref, single)


@pytest.mark.slow
def test_fsdp_run_matches_one_process_and_resumes(tmp_path, corpus):
    """FSDP2 with 2 processes (as torchrun starts them; the DDP test runs torchrun itself): the same run as one
    process; its checkpoints (full state dicts gathered to rank 0) load back into a sharded model, and resuming
    from one gives the uninterrupted run bit for bit."""
    sets = [f"data.corpus={corpus}", "train.steps=12", "train.batch_size=8", "train.micro_batch=4",
            "train.parallel=fsdp", "train.log_every=1", "train.eval_every=6", "train.ckpt_every=4", "train.keep=0"]
    run, resumed, single = tmp_path / "fsdp", tmp_path / "resumed", tmp_path / "single"
    finish(*ranks(run, sets))
    train(load_config("tiny", sets), single, progress=False)
    assert_close_runs(run, single)

    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step_00000004", resumed / "checkpoints" / "step_00000004")
    shutil.copy(run / "metrics.jsonl", resumed / "metrics.jsonl")
    finish(*ranks(resumed, sets))
    assert_same_run(run, resumed)

    # an FSDP checkpoint (AdamW state keyed by parameter name) cannot be resumed by one process
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step_00000004", other / "checkpoints" / "step_00000004")
    with pytest.raises(UserError, match="saved by FSDP"):
        train(load_config("tiny", sets), other, progress=False)


# ---- configuration errors ------------------------------------------------------------------------------


def test_micro_batch_must_divide_the_batch(tmp_path, corpus):
    cfg = load_config("tiny", [f"data.corpus={corpus}", "train.batch_size=8", "train.micro_batch=3"])
    with pytest.raises(UserError, match="micro_batch"):
        train(cfg, tmp_path / "run", progress=False)
    cfg = load_config("tiny", [f"data.corpus={corpus}", "train.parallel=zero3"])
    with pytest.raises(UserError, match="train.parallel"):
        train(cfg, tmp_path / "run", progress=False)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_with_one_process_still_wraps_the_model(monkeypatch, mode):
    """torchrun --nproc-per-node 1 (one GPU checking the DDP and FSDP paths) must not fall back to
    the plain single-process step: the process group exists and the loss module is wrapped."""
    import torch.distributed as dist

    from md4.distributed import setup

    port = md4proc.free_port()
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    par = setup(mode, "cpu")
    try:
        assert par.active and par.world == 1 and par.mode == mode and dist.is_initialized()
        model, ema = worker.build(), worker.build()
        wrapped = par.wrap(model, ema)
        if mode == "ddp":
            assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
        else:
            from torch.distributed.fsdp import FSDPModule
            assert isinstance(model.net, FSDPModule)
    finally:
        par.close()
    assert not dist.is_initialized()
    monkeypatch.delenv("RANK")
    assert not setup(mode, "cpu").active  # no torchrun environment: the plain step
