"""Training-step throughput of the md4 Transformer on this CPU: forward + backward + AdamW.

    python bench/train_throughput.py            # MD4 text8 model: V=27, N=256, 6 x 384, 6 heads, B=32
    python bench/train_throughput.py --tiny     # a few seconds, for CI

The step is the real one: md4.MD4's continuous-time NELBO (antithetic t, masking, 1/t-weighted
masked cross-entropy) per token, backward, AdamW. Each dtype runs in a fresh subprocess, so that its
peak memory is its own: "peak RSS" is the subprocess's maximum resident set (getrusage; the
whole process, with the ~0.3 GB of the torch runtime), "train RSS" its growth from just before
the first step (activations, gradients, AdamW state, allocator caches). In the same subprocess
a dense n x n x n matmul of the same dtype gives the machine's attainable rate, and MFU = model
FLOP/s / that rate, with model FLOPs from `Transformer.flops_per_token` (6 P + 12 L D N).
"other load" is the CPU time used by other processes during the timed steps (/proc/stat), in
cores: on a shared machine, numbers taken with other load > 0.1 are not this code's speed.
(OpenMP's default spin-waiting makes a 2-thread run several times slower when another process
holds a core; OMP_WAIT_POLICY=PASSIVE in the environment trades ~5% when idle for robustness.)
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from md4.diffusion import MD4
from md4.nn import Transformer

TINY = dict(vocab=27, length=32, layers=2, dim=64, heads=2, batch=4, steps=3, warmup=1, matmul=256)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=27)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--glu", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--time-cond", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, caches)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated, of fp32 and bf16 (autocast)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--matmul", type=int, default=2048, help="size n of the reference n^3 matmul")
    p.add_argument("--tiny", action="store_true", help=f"small defaults for a quick check: {TINY}")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one dtype, print JSON
    args, _ = p.parse_known_args(argv)
    if args.tiny:
        p.set_defaults(**TINY)  # explicit flags still win
    args = p.parse_args(argv)
    bad = set(args.dtypes.split(",")) - {"fp32", "bf16"}
    if bad:
        p.error(f"unknown dtype(s) {sorted(bad)}; choose from fp32, bf16")
    return args


def busy_cpu_seconds() -> float:
    """CPU-seconds spent by every process on the machine so far (Linux), else NaN."""
    try:
        with open("/proc/stat") as f:
            user, nice, system = map(int, f.readline().split()[1:4])
        return (user + nice + system) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mb()


def matmul_gflops(n: int, dtype: torch.dtype, reps: int = 10) -> float:
    """Best rate of an n x n @ n x n matmul, GFLOP/s: what dense work attains here."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def train_step(model, opt, args, bf16: bool) -> None:
    """One MD4 training step as md4.train runs it: the continuous-time NELBO (antithetic t,
    masking, 1/t-weighted masked cross-entropy) per token, backward, AdamW."""
    B, N, V = args.batch, args.length, args.vocab
    x = torch.randint(0, V, (B, N))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = MD4(V).loss(model, x) / N
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def run_variant(args) -> dict:
    """Time one dtype in this process; returns the numbers for one table row."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bf16 = args.variant == "bf16"
    model = Transformer(args.vocab, args.dim, args.layers, args.heads, glu=args.glu,
                        time_cond=args.time_cond, max_len=args.length)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    fwd = torch.compile(model) if args.compile else model
    rss_before = current_rss_mb()
    start = time.perf_counter()
    for _ in range(args.warmup):
        train_step(fwd, opt, args, bf16)
    warmup_s = time.perf_counter() - start
    times, busy, own = [], busy_cpu_seconds(), own_cpu_seconds()
    for _ in range(args.steps):
        start = time.perf_counter()
        train_step(fwd, opt, args, bf16)
        times.append(time.perf_counter() - start)
    other_load = (busy_cpu_seconds() - busy - (own_cpu_seconds() - own)) / sum(times)
    peak_rss = peak_rss_mb()  # before the matmul, which may allocate more
    mm = matmul_gflops(args.matmul, torch.bfloat16 if bf16 else torch.float32)
    step_s = statistics.mean(times)
    tokens_s = args.batch * args.length / step_s
    model_gflops = model.flops_per_token(args.length) * tokens_s / 1e9
    return dict(dtype=args.variant, tokens_s=tokens_s, step_ms=1e3 * step_s,
                step_std_ms=1e3 * statistics.stdev(times) if len(times) > 1 else 0.0,
                warmup_s=warmup_s, model_gflops=model_gflops, matmul_gflops=mm,
                mfu=model_gflops / mm, peak_rss_mb=peak_rss, train_rss_mb=peak_rss - rss_before,
                other_load=max(other_load, 0.0))


ROW = ("| {dtype} | {tokens_s:,.0f} | {step_ms:,.0f} ± {step_std_ms:,.0f} | {model_gflops:,.1f} | "
       "{matmul_gflops:,.0f} | {mfu:.1%} | {peak_rss_mb:,.0f} | {train_rss_mb:,.0f} | {other_load:.2f} |")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return
    model = Transformer(args.vocab, args.dim, args.layers, args.heads, glu=args.glu,
                        time_cond=args.time_cond, max_len=args.length)
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs; "
          f"V={args.vocab} N={args.length} layers={args.layers} dim={args.dim} heads={args.heads} "
          f"batch={args.batch} glu={args.glu} time_cond={args.time_cond} compile={args.compile}")
    print(f"parameters: {model.num_params():,} ({model.num_params(embeddings=False):,} without "
          f"the embedding); training FLOPs per token: {model.flops_per_token(args.length) / 1e6:.1f} M")
    rows = []
    for dtype in args.dtypes.split(","):
        argv_child = (sys.argv[1:] if argv is None else list(argv)) + ["--variant", dtype]
        proc = subprocess.run([sys.executable, __file__, *argv_child], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{dtype} variant failed:\n{proc.stderr}")
        r = json.loads(proc.stdout.split("RESULT ", 1)[1])
        print(f"{dtype}: {r['tokens_s']:,.0f} tokens/s, step {r['step_ms']:,.0f} ± "
              f"{r['step_std_ms']:,.0f} ms (warmup {r['warmup_s']:.1f} s), "
              f"{r['model_gflops']:,.1f} model GFLOP/s, matmul {r['matmul_gflops']:,.0f} GFLOP/s, "
              f"MFU {r['mfu']:.1%}, peak RSS {r['peak_rss_mb']:,.0f} MB "
              f"(train {r['train_rss_mb']:,.0f} MB), other load {r['other_load']:.2f} cores", flush=True)
        rows.append(r)
    print("\n| dtype | tokens/s | step ms | model GFLOP/s | matmul GFLOP/s | MFU | peak RSS MB "
          "| train RSS MB | other load |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(ROW.format(**r))


if __name__ == "__main__":
    main()
