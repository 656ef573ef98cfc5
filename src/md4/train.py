"""The training loop: AdamW, warm-up + cosine decay, gradient clipping, EMA, checkpoints.

    run = train(load_config("demo"), "runs/demo")

A run folder holds `config.yaml`, `metrics.jsonl` (and TensorBoard events when installed),
`checkpoints/step_*/` (the last `train.keep`) and, once finished, `model/` (config.json +
EMA weights in model.safetensors). Calling `train` on a folder that has a checkpoint resumes
it with the config the folder's config.yaml holds (`train(cfg, ...)` refuses a `cfg` that differs
from it outside md4.config.RESUME_KEYS); on CPU a run killed at any moment and resumed gives
exactly the losses and weights of an uninterrupted run, because every source of randomness (data
order, diffusion times and masks, dropout) lives in a generator whose state is saved with the
weights. With a time budget (train.max_minutes) the training seconds spent so far are saved too,
and the learning-rate schedule follows whichever of steps and time runs out first.

One process trains a folder at a time (an OS lock, md4.checkpoint.lock_run). Until a resumed
run writes its first checkpoint it leaves config.yaml and metrics.jsonl as they were, so a run
that fails early (a NaN loss, a full disk) changes nothing the user had.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from md4 import checkpoint, distributed
from md4.build import Bundle, build, model_metadata, upgrade_optimizer, upgrade_weights
from md4.config import Config, check_resume, load_config
from md4.data import check_labels, eval_chunks, load_corpus
from md4.errors import UserError
from md4.evaluate import sequence_nelbo, summarize
from md4.logsinks import Metrics


clock = time.monotonic  # training seconds are measured with this (tests replace it)


def lr_at(step: int, cfg, elapsed: float = 0.0, warmup_elapsed: float = 0.0) -> float:
    """Linear warm-up for `warmup` steps, then cosine decay to floor = min_lr_ratio * lr:

        lr(p) = floor + (lr - floor) (1 + cos(pi min(p, 1))) / 2,   p = (step - warmup) / (steps - warmup).

    With a time budget B = 60 max_minutes seconds, p = max(that, (elapsed - warmup_elapsed) /
    (B - warmup_elapsed)), where elapsed is the training time so far and warmup_elapsed the time
    the warm-up took: the decay ends with the budget on a machine too slow to reach `steps` in it
    (and with `steps` on a fast one). The warm-up is counted in steps either way."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    budget = 60 * cfg.max_minutes
    if budget > 0:
        progress = max(progress, (elapsed - warmup_elapsed) / max(budget - warmup_elapsed, 1e-9))
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def planned_steps(step: int, cfg, elapsed: float, rate: float) -> int:
    """The step the run will end at: train.steps, or, with a time budget, the step where the
    budget runs out at `rate` steps per second (what the progress bar counts to)."""
    budget = 60 * cfg.max_minutes
    if budget <= 0 or rate <= 0:
        return cfg.steps
    return max(step, min(cfg.steps, step + math.ceil((budget - elapsed) * rate)))


def use_bf16(setting: str, device: torch.device) -> bool:
    if setting not in ("auto", "true", "false"):
        raise UserError(f"train.bf16 must be auto, true or false, got {setting!r}.")
    if setting != "auto":
        return setting == "true"
    if device.type == "cuda":
        return True
    return device.type == "cpu" and native_bf16_cpu()


def native_bf16_cpu(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16), where bf16
    matmuls run about 2x faster than fp32. oneDNN's own check also says yes on AVX-512 CPUs that
    only emulate bf16 (slower than fp32), so on Linux the CPU flags decide; elsewhere oneDNN does.
    `cpuinfo`: the text of /proc/cpuinfo (tests)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    flags = set(cpuinfo.split())
    return bool(flags & {"avx512_bf16", "amx_bf16"}) and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def make_optimizer(model: Bundle, cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on the network's matrices only (not on norms, biases or gains);
    the method's own parameters (a learnable schedule), if any, get a third group with learning
    rate schedule_lr_scale x lr and weight decay schedule_weight_decay."""
    decay = [p for p in model.net.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.net.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    own = list(model.method.parameters())
    if own:
        groups.append({"params": own, "weight_decay": cfg.schedule_weight_decay, "lr_scale": cfg.schedule_lr_scale})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


class NoMetrics:
    """What ranks other than 0 log: nothing."""

    def log(self, step: int, **values) -> None:
        pass

    def commit(self) -> None:
        pass

    def close(self) -> None:
        pass


def train(cfg: Config, out: str | Path, progress: bool = True) -> Path:
    """Train (or resume) the run in folder `out`; returns the finished model folder.
    Under torchrun, every process runs this (see md4.distributed); rank 0 writes the files."""
    run_dir = Path(out)
    tc = cfg.train
    par = distributed.setup(tc.parallel, tc.device)
    made, lock = checkpoint.first_missing(run_dir), None  # a failed new run leaves no folder behind
    try:
        lock = take_lock(run_dir, par)
        return _train(cfg, run_dir, progress and par.main, par)
    except BaseException:
        if made is not None and lock is not None and [p.name for p in run_dir.iterdir()] == [checkpoint.LOCK]:
            shutil.rmtree(made, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            os.close(lock)
        par.close()


def take_lock(run_dir: Path, par: distributed.Parallel) -> int | None:
    """Rank 0 locks the run folder (md4.checkpoint.lock_run) and removes what killed writers left;
    when it cannot, every rank raises (none waits for the others forever)."""
    fd, error = None, None
    if par.main:
        try:
            fd = checkpoint.lock_run(run_dir)
            checkpoint.remove_debris(run_dir)
        except (UserError, OSError) as e:
            error = e
    if par.active and par.any(error is not None) and error is None:
        error = UserError(f"Run folder {run_dir} could not be locked by rank 0; see its error.")
    if error is not None:
        if fd is not None:
            os.close(fd)
        raise error
    return fd


def set_generator_state(gen: torch.Generator, state: torch.Tensor, saved_on: str, device: torch.device) -> None:
    """Restore a generator saved on a device of type `saved_on`. A state from another kind of
    device (CPU and CUDA generators differ) seeds it instead, from the saved state's bytes."""
    if saved_on == device.type:
        gen.set_state(state.to(gen.get_state().device))
    else:
        gen.manual_seed(int.from_bytes(hashlib.sha256(state.numpy().tobytes()).digest()[:8], "little") >> 1)


def _train(cfg: Config, run_dir: Path, progress: bool, par: distributed.Parallel) -> Path:
    tc = cfg.train
    device = par.device
    micro = par.check_batch(tc.batch_size, tc.micro_batch)
    bf16 = use_bf16(tc.bf16, device)
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)

    corpus = load_corpus(cfg.data.corpus, min_length=cfg.data.length)
    V, N = corpus.tokenizer.vocab_size, cfg.data.length
    torch.manual_seed(tc.seed)
    method, net = build(cfg, V, tokenizer=corpus.tokenizer)  # records: impossible values get no mass
    model = Bundle(method, net).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    ema_net, ema_method = ema.net, ema.method
    loss_module = par.wrap(model, ema)  # FSDP shards model and ema in place, before the optimizer sees them
    if tc.compile:
        net.compile()
    opt = make_optimizer(model, tc, device)
    data_gen = torch.Generator().manual_seed(tc.seed + 1)  # training crops (on CPU)
    noise_gen = torch.Generator(device).manual_seed(tc.seed + 2)  # diffusion times and masks
    valid = eval_chunks(corpus.valid, N)[: tc.eval_batches * tc.batch_size]
    num_classes = cfg.model.num_classes  # > 0: class-conditional, trained with label dropout
    check_labels(corpus, "train", num_classes)
    valid_labels = check_labels(corpus, "valid", num_classes)
    valid_labels = valid_labels[: len(valid)] if valid_labels is not None else None

    saved_config = run_dir / "config.yaml"
    config_text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if saved_config.is_file():  # a resume: only md4.config.RESUME_KEYS may differ
        check_resume(load_config(saved_config), cfg, saved_config)
    step, st, elapsed, warm = 0, {}, 0.0, None
    found = checkpoint.checkpoints(run_dir)
    if found:
        ck = checkpoint.load_checkpoint(found[-1])
        par.load_weights(model, upgrade_weights(ck["model"]), found[-1])
        par.load_weights(ema, upgrade_weights(ck["ema"]), found[-1])
        try:
            par.load_optimizer(model, opt, upgrade_optimizer(ck["optim"]))
        except (ValueError, KeyError, RuntimeError):
            raise UserError(f"Optimizer state in {found[-1]} does not match the model configuration.")
        st = ck["state"]
        try:
            step = int(st["step"])
            data_gen.set_state(checkpoint.decode_state(st["data_rng"]))
            set_generator_state(noise_gen, checkpoint.decode_state(st["noise_rng"]),
                                str(st.get("noise_device", device.type)), device)
            torch.set_rng_state(checkpoint.decode_state(st["torch_rng"]))
            elapsed, warm = st.get("elapsed", 0.0), st.get("warmup_elapsed")  # seconds (checked numbers >= 0)
            if warm is not None and warm > elapsed:
                raise ValueError(f"warmup_elapsed {warm} exceeds elapsed {elapsed}")
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"Checkpoint {found[-1]} has a damaged state.json ({type(e).__name__}: {e}).")
        if device.type == "cuda" and "cuda_rng" in st:
            torch.cuda.set_rng_state(checkpoint.decode_state(st["cuda_rng"]), device)
    if step > tc.steps:
        raise UserError(f"This run has reached step {step}, past train.steps={tc.steps}; "
                        f"resume it with train.steps of at least {step}.")
    par.barrier()  # every rank has read the checkpoint before rank 0 writes anything
    metrics = Metrics(run_dir, step, tc.log, cfg.to_dict()) if par.main else NoMetrics()  # md4.logsinks
    new_config = None  # config.yaml to write with the next checkpoint
    if par.main and not saved_config.is_file():
        checkpoint.write_text_atomic(saved_config, config_text)
    elif par.main and saved_config.read_text() != config_text:
        new_config = config_text  # an allowed change (md4.config.RESUME_KEYS)

    def save(step: int) -> None:
        nonlocal new_config
        state = {"data_rng": checkpoint.encode_state(data_gen.get_state()),
                 "noise_rng": checkpoint.encode_state(noise_gen.get_state()), "noise_device": device.type,
                 "torch_rng": checkpoint.encode_state(torch.get_rng_state()),
                 # the running means not yet logged, so a resumed run logs exactly the same values
                 "run_loss": run_loss.item(), "run_gnorm": run_gnorm.item(), "run_n": run_n,
                 "elapsed": elapsed}  # training seconds so far, for the time budget
        if warm is not None:
            state["warmup_elapsed"] = warm  # the seconds the warm-up took
        if device.type == "cuda":
            state["cuda_rng"] = checkpoint.encode_state(torch.cuda.get_rng_state(device))
        states = par.state_dicts(model, ema, opt)  # full state dicts on rank 0 (gathered for FSDP)
        if par.main:
            checkpoint.save_checkpoint(run_dir, step, *states, state, keep=tc.keep)
            if new_config is not None:
                checkpoint.write_text_atomic(saved_config, new_config)
                new_config = None
            metrics.commit()

    def validate(step: int) -> float:
        nelbo = sequence_nelbo(ema_method, ema_net, valid, batch_size=tc.batch_size, seed=tc.seed, device=device,
                               autocast_dtype=torch.bfloat16 if bf16 else None, labels=valid_labels)
        bpc = summarize(nelbo, N)["bits_per_token"]
        metrics.log(step, valid_bpc=bpc)
        return bpc

    params = [p for p in model.parameters()]
    ema_params = [distributed.local(p) for p in ema.parameters()]  # FSDP: each rank averages its shards
    own_params = [distributed.local(p) for p in params]
    per_token = math.log(2)
    model.train()
    run_n = int(st.get("run_n", 0))
    run_loss = torch.tensor(float(st.get("run_loss", 0.0)), device=device)
    run_gnorm = torch.tensor(float(st.get("run_gnorm", 0.0)), device=device)
    budget = 60 * tc.max_minutes  # seconds; 0 = no time limit
    if warm is None and step >= tc.warmup:
        warm = elapsed
    first_step, first_elapsed, t0 = step, elapsed, clock()  # the clock is read once here and once per step
    bar = tqdm(total=tc.steps, initial=step, desc="training", unit="step", disable=not progress, dynamic_ncols=True)
    postfix = {}
    while step < tc.steps and not (budget and elapsed >= budget):
        lr = lr_at(step, tc, elapsed, warm or 0.0)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss = par.forward_backward(loss_module, model, corpus, tc.batch_size, micro, N, data_gen, tc.seed, step,
                                    device, bf16, num_classes, tc.label_dropout, noise=noise_gen)  # nats per token
        gnorm = par.clip_grad_norm(params, tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        # EMA with the usual warm-up, so that short runs get useful averaged weights.
        decay = min(tc.ema, (1 + step) / (10 + step)) if tc.ema > 0 else 0.0
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, own_params, 1 - decay)
        step += 1
        run_loss += loss.detach()  # accumulated on the device: no host sync inside the step
        run_gnorm += gnorm.detach()
        run_n += 1
        elapsed = first_elapsed + clock() - t0
        if budget and par.active:
            elapsed = par.maximum(elapsed)  # every rank: the same lr, and the same last step
        if warm is None and step >= tc.warmup:
            warm = elapsed
        last = step == tc.steps or bool(budget and elapsed >= budget)
        if budget:  # the bar counts to the step where the budget will end, at the rate so far
            rate = (step - first_step) / max(elapsed - first_elapsed, 1e-9)
            bar.total = planned_steps(step, tc, elapsed, rate)
        bar.update(1)
        log_now, ckpt_now = step % tc.log_every == 0 or last, step % tc.ckpt_every == 0 or last
        if log_now or ckpt_now:
            bpc, gn = run_loss.item() / run_n / per_token, run_gnorm.item() / run_n
            if not (math.isfinite(bpc) and math.isfinite(gn)):
                raise UserError(f"The training loss became {bpc} at step {step}; lower train.lr (in a new run "
                                f"folder) or check the data (the last good checkpoint is kept).")
        if log_now:
            metrics.log(step, loss_bpc=bpc, grad_norm=gn, lr=lr, seconds=round(elapsed, 3))
            postfix["bpc"] = f"{bpc:.3f}"
            run_loss.zero_()
            run_gnorm.zero_()
            run_n = 0
        if step % tc.eval_every == 0 or last:
            postfix["valid"] = f"{validate(step):.3f}"
        bar.set_postfix(postfix, refresh=False)
        if ckpt_now:
            save(step)
        if last:
            break
    bar.close()
    metrics.close()
    model_dir = run_dir / "model"
    states = par.state_dicts(model, ema, opt) if par.mode == "fsdp" else (None, ema.state_dict(), None)
    if par.main:
        tok = corpus.tokenizer
        checkpoint.save_model(model_dir, model_metadata(cfg, V, tok.name, tok.args()), states[1])
        plot_curves(run_dir)
    par.barrier()
    return model_dir


def train_unless_done(cfg: Config, out: str | Path) -> Path:
    """The model folder of run `out`, training (or resuming) it first unless it has finished: for
    benchmarks that compare several runs and may be re-run."""
    model_dir = Path(out) / "model"
    if not (model_dir / "config.json").exists():
        print(f"== training {cfg.method} in {out}", file=sys.stderr)
        train(cfg, out)
    return model_dir


def plot_curves(run_dir: Path) -> Path | None:
    """training_curve.png from metrics.jsonl: training loss and validation bpc against steps."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tr = [(r["step"], r["loss_bpc"]) for r in recs if "loss_bpc" in r]
    va = [(r["step"], r["valid_bpc"]) for r in recs if "valid_bpc" in r]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    if tr:
        ax.plot(*zip(*tr), label="train NELBO (bpc)", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="valid NELBO, EMA weights (bpc)")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per character")
    ax.set_title(f"MD4 training: {run_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    path = run_dir / "training_curve.png"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fig.tight_layout()
    try:
        with checkpoint.removed_on_error(tmp), checkpoint.naming(tmp):
            fig.savefig(tmp, dpi=110, format="png")
            os.replace(tmp, path)
    finally:
        plt.close(fig)
    return path
