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

from md4 import checkpoint
from md4.config import Config
from md4.data import draw_batch, eval_chunks, load_corpus
from md4.errors import UserError
from md4.evaluate import sequence_nelbo, summarize
from md4.guidance import drop_labels, with_labels
from md4.pretrained import Bundle, build, check_labels, model_metadata, resolve_device


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
    the method's own parameters (a learnable schedule) join the undecayed group."""
    decay = [p for p in model.net.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.net.parameters() if p.ndim < 2] + list(model.diffusion.parameters())
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


class Metrics:
    """metrics.jsonl (one JSON object per line), plus TensorBoard events when installed."""

    def __init__(self, run_dir: Path, resume_step: int):
        self.path = run_dir / "metrics.jsonl"
        kept = []
        if self.path.exists():  # drop what a killed run logged after its last checkpoint
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("step", 0) <= resume_step:
                    kept.append(line)
        checkpoint.write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
        except Exception:  # tensorboard not installed
            self.tb = None

    def log(self, step: int, **values) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.file.close()
        if self.tb:
            self.tb.close()


def train(cfg: Config, out: str | Path, progress: bool = True) -> Path:
    """Train (or resume) the run in folder `out`; returns the finished model folder."""
    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    tc = cfg.train
    device = resolve_device(tc.device)
    bf16 = use_bf16(tc.bf16, device)
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)

    corpus = load_corpus(cfg.data.corpus, min_length=cfg.data.length)
    V, N = corpus.tokenizer.vocab_size, cfg.data.length
    torch.manual_seed(tc.seed)
    diffusion, net = build(cfg, V)
    model = Bundle(diffusion, net).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    ema_net, ema_diffusion = ema.net, ema.diffusion
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
        checkpoint.load_into(model, ck["model"], found[-1])
        checkpoint.load_into(ema, ck["ema"], found[-1])
        try:
            opt.load_state_dict(ck["optim"])
        except (ValueError, KeyError, RuntimeError):
            raise UserError(f"Optimizer state in {found[-1]} does not match the model configuration.")
        st = ck["state"]
        step = int(st["step"])
        data_gen.set_state(checkpoint.decode_state(st["data_rng"]))
        noise_gen.set_state(checkpoint.decode_state(st["noise_rng"]).to(noise_gen.get_state().device))
        torch.set_rng_state(checkpoint.decode_state(st["torch_rng"]))
        if device.type == "cuda" and "cuda_rng" in st:
            torch.cuda.set_rng_state(checkpoint.decode_state(st["cuda_rng"]), device)
    checkpoint.write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    metrics = Metrics(run_dir, step)

    def save(step: int) -> None:
        state = {"data_rng": checkpoint.encode_state(data_gen.get_state()),
                 "noise_rng": checkpoint.encode_state(noise_gen.get_state()),
                 "torch_rng": checkpoint.encode_state(torch.get_rng_state()),
                 # the running means not yet logged, so a resumed run logs exactly the same values
                 "run_loss": run_loss.item(), "run_gnorm": run_gnorm.item(), "run_n": run_n}
        if device.type == "cuda":
            state["cuda_rng"] = checkpoint.encode_state(torch.cuda.get_rng_state(device))
        checkpoint.save_checkpoint(run_dir, step, model.state_dict(), ema.state_dict(), opt.state_dict(),
                                   state, keep=tc.keep)

    def validate(step: int) -> float:
        nelbo = sequence_nelbo(ema_diffusion, ema_net, valid, batch_size=tc.batch_size, seed=tc.seed, device=device,
                               autocast_dtype=torch.bfloat16 if bf16 else None, labels=valid_labels)
        bpc = summarize(nelbo, N)["bits_per_token"]
        metrics.log(step, valid_bpc=bpc)
        return bpc

    params = [p for p in model.parameters()]
    ema_params = [p for p in ema.parameters()]
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
            group["lr"] = lr
        x0, y = draw_batch(corpus, tc.batch_size, N, data_gen)  # random crops (text) or rows (images)
        x0 = x0.to(device, non_blocking=True)
        y = drop_labels(y, tc.label_dropout, num_classes, data_gen).to(device) if num_classes else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion.loss(with_labels(net, y), x0, generator=noise_gen) / N  # nats per token: O(1) gradients
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        # EMA with the usual warm-up, so that short runs get useful averaged weights.
        decay = min(tc.ema, (1 + step) / (10 + step)) if tc.ema > 0 else 0.0
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        step += 1
        run_loss += loss.detach()  # accumulated on the device: no host sync inside the step
        run_gnorm += gnorm.detach()
        run_n += 1
        bar.update(1)
        last = step == tc.steps or bool(tc.max_minutes and time.time() - t0 > 60 * tc.max_minutes)
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
    checkpoint.save_model(model_dir, model_metadata(cfg, V, getattr(corpus.tokenizer, "name", "char"),
                                                    getattr(corpus.tokenizer, "args", dict)()), ema.state_dict())
    plot_curves(run_dir)
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
