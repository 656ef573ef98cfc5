"""Accelerator throughput of MD4 small (GPT-2 small size) at length 1024: training and sampling.

    python bench/gpu_throughput.py                  # on a GPU: V=50257, N=1024, 12 x 768, largest batch that fits
    python bench/gpu_throughput.py --compile        # the same with torch.compile
    python bench/gpu_throughput.py --tiny           # seconds on a CPU, for CI

Training: the step md4.train runs (MD4 continuous-time loss per token, backward, gradient-norm,
AdamW, fused on CUDA, and the EMA update) on random tokens already on the device, so the data
loader is not measured. --dtype auto (the default) runs in the dtype md4 trains in on this device
(md4.train.use_bf16: bf16 autocast on a GPU and on CPUs with native bf16, else fp32). Micro-batch
sizes double from 1 until one runs out of memory (or --batches lists them); each is timed after
--warmup untimed steps. MFU = model FLOP/s / the attained matmul rate in the run's dtype, measured
here on an n x n x n matmul (not the datasheet peak), with model FLOPs from
`Transformer.flops_per_token` (6 P + 12 L D N per token); the table names the dtype. On a CPU
without native bf16, bf16 matmuls are emulated and slow, so an MFU against them says nothing: use
fp32 there (what auto picks).
Sampling: the ancestral sampler at length 1024 (float64 categorical draws, as the library does),
--sample-num sequences, --sample-steps steps; tokens/s = sequences x length / seconds.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch

from md4 import train
from md4.build import Bundle, resolve_device
from md4.config import TrainConfig
from md4.diffusion import MD4
from md4.nn import Transformer

TINY = dict(vocab=257, length=64, layers=2, dim=64, heads=2, batches="2,4", steps=2, warmup=1, matmul=256,
            sample_num=2, sample_steps=4)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--batches", default="auto", help="comma-separated micro-batch sizes, or auto (double until OOM)")
    p.add_argument("--max-batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=10, help="timed steps per batch size")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto = what md4 trains in here (bf16 on GPUs and CPUs with native bf16, else fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--matmul", type=int, default=8192, help="size n of the reference n^3 matmul")
    p.add_argument("--sample-num", type=int, default=16)
    p.add_argument("--sample-steps", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--tiny", action="store_true", help=f"small defaults for a quick CPU check: {TINY}")
    args, _ = p.parse_known_args(argv)
    if args.tiny:
        p.set_defaults(**TINY)
    return p.parse_args(argv)


def pick_dtype(name: str, device: torch.device) -> str:
    """The dtype to run in, bf16 or fp32: the --dtype given, or for auto the one md4.train uses on `device`."""
    if name != "auto":
        return name
    return "bf16" if train.use_bf16("auto", device) else "fp32"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(n: int, dtype: torch.dtype, device: torch.device, reps: int = 10) -> float:
    """Best attained rate of an n x n @ n x n matmul in TFLOP/s."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def build(args, device: torch.device) -> tuple[Bundle, Transformer]:
    torch.manual_seed(0)
    net = Transformer(args.vocab, args.dim, args.layers, args.heads, time_cond=True, max_len=args.length)
    return Bundle(MD4(args.vocab), net).to(device), net


def training_step(args, device: torch.device, batch: int, bf16: bool):
    """The md4.train step at micro-batch `batch` on random tokens on the device, as a function of
    no arguments (allocates the model and optimizer; OOM surfaces at the first call)."""
    model, net = build(args, device)
    ema = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    opt = train.make_optimizer(model, TrainConfig(), device)
    fwd = torch.compile(net) if args.compile else net
    g = torch.Generator(device).manual_seed(0)
    x = torch.randint(0, args.vocab, (batch, args.length), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model.method.loss(fwd, x, generator=g) / args.length
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1e-4)

    return step


def time_training(args, device: torch.device, batch: int, bf16: bool) -> dict:
    """Seconds per step of the md4.train step at micro-batch `batch` (raises OOM if it does not fit)."""
    step = training_step(args, device, batch, bf16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(batch=batch, step_ms=1e3 * step_s, tokens_s=batch * args.length / step_s, warmup_s=warmup_s,
                peak_gib=peak)


def is_oom(e: Exception) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def time_sampling(args, device: torch.device, bf16: bool) -> dict:
    model, net = build(args, device)
    net.eval()
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        model.method.sample(net, 1, args.length, steps=2, generator=g, device=device)  # warm-up
        sync(device)
        start = time.perf_counter()
        model.method.sample(net, args.sample_num, args.length, steps=args.sample_steps, generator=g, device=device)
        sync(device)
    seconds = time.perf_counter() - start
    return dict(num=args.sample_num, steps=args.sample_steps, seconds=seconds,
                step_ms=1e3 * seconds / args.sample_steps, tokens_s=args.sample_num * args.length / seconds)


def sweep(args, device: torch.device, bf16: bool, flops: float, peak: float,
          say=functools.partial(print, flush=True)) -> list[dict]:
    """time_training at each micro-batch of args.batches ("auto": 1, 2, 4, ... up to
    args.max_batch) until one runs out of memory; each row gets its MFU against `peak` TFLOP/s."""
    if args.batches == "auto":
        batches = [2**k for k in range(20) if 2**k <= args.max_batch]
    else:
        batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for b in batches:
        try:
            r = time_training(args, device, b, bf16)
        except (RuntimeError, torch.OutOfMemoryError) as e:
            if not is_oom(e):
                raise
            say(f"batch {b}: out of memory")
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        r["mfu"] = flops * r["tokens_s"] / (peak * 1e12)
        r["memory"] = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        say(f"batch {b}: {r['tokens_s']:,.0f} tokens/s, step {r['step_ms']:,.1f} ms, "
            f"MFU ({'bf16' if bf16 else 'fp32'}) {r['mfu']:.1%}, "
            f"peak memory {r['memory']} GiB (warm-up {r['warmup_s']:.1f} s)")
        rows.append(r)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    bf16 = dtype == "bf16"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    _, net = build(args, torch.device("meta"))
    flops = net.flops_per_token(args.length)
    peak = matmul_tflops(args.matmul, torch.bfloat16 if bf16 else torch.float32, device)
    print(f"{name}, torch {torch.__version__}; V={args.vocab} N={args.length} layers={args.layers} dim={args.dim} "
          f"heads={args.heads} dtype={dtype} compile={args.compile}; {net.num_params():,} parameters, "
          f"{flops / 1e9:.3f} GFLOP per token (training); attained {dtype} matmul {peak:.4g} TFLOP/s (n={args.matmul})")
    rows = sweep(args, device, bf16, flops, peak)
    if not rows:
        raise SystemExit("not even the smallest batch fits")
    s = time_sampling(args, device, bf16)
    print(f"sampling: {s['num']} x {args.length} tokens, {s['steps']} steps: {s['seconds']:.2f} s "
          f"({s['step_ms']:.1f} ms per step, {s['tokens_s']:,.0f} tokens/s)")
    print(f"\n| micro-batch | dtype | tokens/s | step ms | MFU of the {dtype} matmul rate | peak GiB |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {dtype} | {r['tokens_s']:,.0f} | {r['step_ms']:,.1f} | {r['mfu']:.1%} "
              f"| {r['memory']} |")
    print("RESULT " + json.dumps({"device": name, "dtype": dtype, "matmul_tflops": peak, "flops_per_token": flops,
                                  "train": rows, "largest_batch": rows[-1]["batch"], "sample": s}))


if __name__ == "__main__":
    main()
