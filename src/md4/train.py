"""The training loop: AdamW, warm-up + cosine decay, gradient clipping, EMA, checkpoints.

    run = train(load_config("demo"), "runs/demo")

A run folder holds `config.yaml`, `metrics.jsonl` (and TensorBoard events when installed),
`checkpoints/step_*/` (the last `train.keep`) and, once finished, `model/` (config.json +
EMA weights in model.safetensors). Calling `train` on a folder that has a checkpoint resumes
it; on CPU a run killed at any moment and resumed gives exactly the losses and weights of an
uninterrupted run, because every source of randomness (data order, diffusion times and masks,
dropout) lives in a generator whose state is saved with the weights.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from md4 import checkpoint, distributed
from md4.build import Bundle, build, model_metadata, upgrade_optimizer, upgrade_weights
from md4.config import Config
from md4.data import check_labels, eval_chunks, load_corpus
from md4.errors import UserError
from md4.evaluate import sequence_nelbo, summarize
from md4.logsinks import Metrics


def lr_at(step: int, cfg) -> float:
    """Linear warm-up for `warmup` steps, then cosine decay to min_lr_ratio * lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def use_bf16(setting: str, device: torch.device) -> bool:
    if setting not in ("auto", "true", "false"):
        raise UserError(f"train.bf16 must be auto, true or false, got {setting!r}.")
    if setting != "auto":
        return setting == "true"
    if device.type == "cuda":
        return True
    # CPUs with native bf16 matrix units (AVX512-BF16 / AMX) run bf16 matmuls about 2x faster.
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


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

    def close(self) -> None:
        pass


def train(cfg: Config, out: str | Path, progress: bool = True) -> Path:
    """Train (or resume) the run in folder `out`; returns the finished model folder.
    Under torchrun, every process runs this (see md4.distributed); rank 0 writes the files."""
    run_dir = Path(out)
    tc = cfg.train
    par = distributed.setup(tc.parallel, tc.device)
    try:
        return _train(cfg, run_dir, progress and par.main, par)
    finally:
        par.close()


def _train(cfg: Config, run_dir: Path, progress: bool, par: distributed.Parallel) -> Path:
    tc = cfg.train
    device = par.device
    micro = par.check_batch(tc.batch_size, tc.micro_batch)
    if par.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    bf16 = use_bf16(tc.bf16, device)
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)

    corpus = load_corpus(cfg.data.corpus, min_length=cfg.data.length)
    V, N = corpus.tokenizer.vocab_size, cfg.data.length
    torch.manual_seed(tc.seed)
    method, net = build(cfg, V)
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

    step, st = 0, {}
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
            noise_gen.set_state(checkpoint.decode_state(st["noise_rng"]).to(noise_gen.get_state().device))
            torch.set_rng_state(checkpoint.decode_state(st["torch_rng"]))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"Checkpoint {found[-1]} has a damaged state.json ({type(e).__name__}: {e}).")
        if device.type == "cuda" and "cuda_rng" in st:
            torch.cuda.set_rng_state(checkpoint.decode_state(st["cuda_rng"]), device)
    par.barrier()  # every rank has read the checkpoint before rank 0 writes anything
    metrics = Metrics(run_dir, step, tc.log, cfg.to_dict()) if par.main else NoMetrics()  # md4.logsinks
    if par.main:
        checkpoint.write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def save(step: int) -> None:
        state = {"data_rng": checkpoint.encode_state(data_gen.get_state()),
                 "noise_rng": checkpoint.encode_state(noise_gen.get_state()),
                 "torch_rng": checkpoint.encode_state(torch.get_rng_state()),
                 # the running means not yet logged, so a resumed run logs exactly the same values
                 "run_loss": run_loss.item(), "run_gnorm": run_gnorm.item(), "run_n": run_n}
        if device.type == "cuda":
            state["cuda_rng"] = checkpoint.encode_state(torch.cuda.get_rng_state(device))
        states = par.state_dicts(model, ema, opt)  # full state dicts on rank 0 (gathered for FSDP)
        if par.main:
            checkpoint.save_checkpoint(run_dir, step, *states, state, keep=tc.keep)

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
    t0, run_n = time.time(), int(st.get("run_n", 0))
    run_loss = torch.tensor(float(st.get("run_loss", 0.0)), device=device)
    run_gnorm = torch.tensor(float(st.get("run_gnorm", 0.0)), device=device)
    bar = tqdm(total=tc.steps, initial=step, desc="training", unit="step", disable=not progress, dynamic_ncols=True)
    postfix = {}
    while step < tc.steps:
        lr = lr_at(step, tc)
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
        bar.update(1)
        last = step == tc.steps or bool(tc.max_minutes and time.time() - t0 > 60 * tc.max_minutes)
        if tc.max_minutes and par.active:
            last = par.any(last)  # every rank stops at the same step
        log_now, ckpt_now = step % tc.log_every == 0 or last, step % tc.ckpt_every == 0 or last
        if log_now or ckpt_now:
            bpc, gn = run_loss.item() / run_n / per_token, run_gnorm.item() / run_n
            if not (math.isfinite(bpc) and math.isfinite(gn)):
                raise UserError(f"The training loss became {bpc} at step {step}; lower train.lr or check the data "
                                f"(the last good checkpoint is kept).")
        if log_now:
            metrics.log(step, loss_bpc=bpc, grad_norm=gn, lr=lr, seconds=round(time.time() - t0, 3))
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
