"""One check of the library on a GPU, in at most 8 minutes on one H200, printed as one table.

    bench/gpu_check.sh                        # on a GPU: every section, each in its own process
    bench/gpu_check.sh --tiny                 # tiny sizes on the CPU, in seconds (`make test` runs it)
    python bench/gpu_check.py --sections numerics,throughput --json out.json

Sections (SECTIONS, run in this order; each has a time limit and is guarded: an error, a timeout
or a failed check becomes a row of the table and the next section runs; a section that no longer
fits before the global deadline is skipped and says so):

  device      the GPU, torch, and the attained bf16 matmul rate (an n x n x n product)
  numerics    MD4-S loss and gradients on the GPU and on the CPU in fp32 for the same batch, x_t
              and t (largest relative difference); `cached` sampling equal to `ancestral` on the GPU
  throughput  MD4-S (12 x 768, V = 50257, L = 1024) bf16 training, eager, fused AdamW: tokens/s and
              MFU against the attained matmul rate and against the 989 TFLOP/s dense bf16 spec at
              micro-batches 1, 2, 4, ... up to the largest that fits, peak memory (bench/gpu_throughput.py)
  profile     torch.profiler over training steps at the fastest micro-batch: where the time goes
  compile     the same with torch.compile at that micro-batch (compile time, speed-up)
  data        the plays as GPT-2 BPE shards (md4 data prepare)
  tests       the test suite's CUDA paths (tests/test_cuda.py, skipped without a GPU); with
              --isolate (the default on a GPU) it runs alongside `train`, being mostly CPU work
  train       MD4-S trained for 3 minutes on them (loss must fall), evaluated, sampled
  sampling    tokens/s of the ancestral, cached and jump samplers at length 1024
  distributed a few training steps through torchrun on one GPU, DDP and FSDP2 at once

Statuses: PASS / FAIL (a check with a criterion), INFO (a measurement), SKIP, ERROR (an
exception: its last line), TIMEOUT. Exit status 1 when any row is FAIL, ERROR or TIMEOUT.
Without CUDA (or with --tiny) the sizes are tiny and every section runs on the CPU in seconds.

Data for `data` / `train` / `distributed`: plays.txt (shakespeare/) and gpt2.tiktoken
(tokenizers/), looked for under --data-dir, $MD4_GPU_CHECK_DATA, ./.gpucheck, ./shared/data,
../shared/data and ../../shared/data, in those folders or their subfolders shakespeare/ and
tokenizers/. A device machine receives only the repository, so copy both files into an ignored
folder of it first:  mkdir -p .gpucheck && cp ../shared/data/shakespeare/plays.txt
../shared/data/tokenizers/gpt2.tiktoken .gpucheck/  (and carry .gpucheck).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "src", ROOT / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

import gpu_throughput as gt  # noqa: E402

SPEC_TFLOPS = 989.0  # H100 / H200 SXM dense bf16, the datasheet
MFU_TARGET = 0.5  # of the attained matmul rate
BAD = ("FAIL", "ERROR", "TIMEOUT")

# sizes: MD4-S on a GPU; a few-second version for the CPU
FULL = dict(vocab=50257, length=1024, layers=12, dim=768, heads=12, matmul=8192, max_batch=256, steps=5, warmup=2,
            numerics_length=256, numerics_batch=2, cached_num=4, cached_steps=64, sample_num=16, sample_steps=128,
            train_minutes=3.0, train_batch=64, loss_drop=0.1, eval_limit=64, sample_show=2, sample_show_steps=128,
            dist_steps=8, dist_batch=16, deadline=470.0)
TINY = dict(vocab=257, length=32, layers=2, dim=64, heads=2, matmul=256, max_batch=4, steps=2, warmup=1,
            numerics_length=32, numerics_batch=2, cached_num=2, cached_steps=8, sample_num=2, sample_steps=8,
            train_minutes=0.0, train_batch=4, train_steps=16, loss_drop=0.0, eval_limit=4, sample_show=1,
            sample_show_steps=8,
            dist_steps=2, dist_batch=4, deadline=120.0, plays_chars=100_000)


# ----------------------------------------------------------------------------- the run's state
@dataclass
class Context:
    """What a section sees: options, device, sizes, a work folder shared by the sections, its rows."""

    args: argparse.Namespace
    device: torch.device
    size: dict
    work: Path
    section: str = ""
    rows: list = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def full(self) -> bool:
        """The GPU's recipe (MD4-S presets, timed training), whatever the sizes; else the tiny one."""
        return not self.args.tiny

    def row(self, check: str, status: str, result: str, **data) -> None:
        """One row of the table, in the section's file (work/rows-SECTION.jsonl), also from a child process."""
        r = {"section": self.section, "check": check, "status": status, "result": result, **data}
        self.rows.append(r)
        with open(self.work / f"rows-{self.section}.jsonl", "a") as f:
            f.write(json.dumps(r, default=str) + "\n")

    def save(self, name: str, value) -> None:
        (self.work / f"{name}.json").write_text(json.dumps(value, default=str))

    def load(self, name: str, default=None):
        path = self.work / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else default

    def detail(self, text: str) -> None:
        """Text printed after the table (profiles, samples)."""
        with open(self.work / f"details-{self.section}.txt", "a") as f:
            f.write(f"## {self.section}\n{text.rstrip()}\n\n")

    def model_args(self, **over) -> SimpleNamespace:
        """The options bench/gpu_throughput.py's functions read, at this run's sizes."""
        s = self.size
        batches = "auto" if self.full else ",".join(str(2**k) for k in range(1, 10) if 2**k <= s["max_batch"])
        opts = dict(vocab=s["vocab"], length=s["length"], layers=s["layers"], dim=s["dim"], heads=s["heads"],
                    compile=False, warmup=s["warmup"], steps=s["steps"], max_batch=s["max_batch"], batches=batches)
        return SimpleNamespace(**{**opts, **over})


class SectionTimeout(Exception):
    pass


class Skip(Exception):
    """A section that cannot run here: one SKIP row with the reason."""


def sync(ctx: Context) -> None:
    gt.sync(ctx.device)


def attained_tflops(ctx: Context) -> float:
    got = ctx.load("device", {}).get("matmul_tflops")
    if got:
        return float(got)
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    return gt.matmul_tflops(ctx.size["matmul"], dtype, ctx.device)


def md4_small(ctx: Context, time_cond: bool = True, dropout: float = 0.0, length: int | None = None):
    """(MD4 method, Transformer) at this run's sizes, fp32, on the CPU, seeded."""
    from md4.diffusion import MD4
    from md4.nn import Transformer

    s = ctx.size
    torch.manual_seed(0)
    net = Transformer(s["vocab"], s["dim"], s["layers"], s["heads"], time_cond=time_cond, dropout=dropout,
                      max_len=length or s["length"])
    return MD4(s["vocab"]), net


# ----------------------------------------------------------------------------- sections
def sec_device(ctx: Context) -> None:
    if ctx.cuda:
        p = torch.cuda.get_device_properties(ctx.device)
        name = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, CUDA {torch.version.cuda}"
    else:
        name = f"CPU ({torch.get_num_threads()} threads)"
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    n = ctx.size["matmul"]
    tflops = gt.matmul_tflops(n, dtype, ctx.device)
    ctx.save("device", {"name": name, "matmul_tflops": tflops})
    ctx.row("device", "INFO", f"{name}; torch {torch.__version__}; attained {str(dtype)[6:]} matmul "
            f"{tflops:,.1f} TFLOP/s (n={n})", name=name, matmul_tflops=tflops)


def compare_devices(method, net, x0: torch.Tensor, device: torch.device, generator=None) -> dict:
    """The continuous-time loss (per token) and its gradients for the same x_0, t and x_t on the
    CPU and on `device`, in fp32 (TF32 off): {loss_rel, grad_rel, worst, loss_cpu, loss_device}.
    grad_rel is the largest over parameter tensors of max |g_dev - g_cpu| / max |g_cpu|."""
    from md4.diffusion import antithetic_times

    g = generator or torch.Generator().manual_seed(0)
    t = antithetic_times(len(x0), g)
    xt = method.forward_sample(x0, t, g)
    results = {}
    for where in ("cpu", device):
        model = copy.deepcopy(net).to(where).float().train()
        a, b, c = (v.to(where) for v in (x0, xt, t))
        loss = method.masked_terms(model(b, c), a, b, c).mean() / x0.shape[1]
        loss.backward()
        results[str(where)] = (loss.item(), {n: p.grad.detach().cpu() for n, p in model.named_parameters()
                                             if p.grad is not None})
    (lc, gc), (ld, gd) = results["cpu"], results[str(device)]
    rel = {n: ((gd[n] - gc[n]).abs().max() / gc[n].abs().max().clamp_min(1e-30)).item() for n in gc}
    worst = max(rel, key=rel.get)
    return {"loss_rel": abs(ld - lc) / abs(lc), "grad_rel": rel[worst], "worst": worst, "loss_cpu": lc,
            "loss_device": ld, "tensors": len(rel)}


def cached_vs_ancestral(method, net, num: int, length: int, steps: int, device: torch.device) -> dict:
    """The same seed through `ancestral` and `cached` on `device` (a network that ignores t):
    {equal, agree (fraction of equal tokens), seconds of each}."""
    from md4.sampling import sample

    net = net.to(device).eval()
    out, secs = {}, {}
    for name in ("ancestral", "cached"):
        t0 = time.perf_counter()
        out[name] = sample(method, net, num, length, steps=steps, sampler=name,
                           generator=torch.Generator(device).manual_seed(0), device=device)
        secs[name] = time.perf_counter() - t0
    a, c = out["ancestral"], out["cached"]
    return {"equal": bool(torch.equal(a, c)), "agree": (a == c).double().mean().item(), "seconds": secs}


def sec_numerics(ctx: Context) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    s = ctx.size
    method, net = md4_small(ctx, length=s["numerics_length"])
    x0 = torch.randint(0, s["vocab"], (s["numerics_batch"], s["numerics_length"]),
                       generator=torch.Generator().manual_seed(1))
    r = compare_devices(method, net, x0, ctx.device)
    where = "GPU vs CPU" if ctx.cuda else "CPU vs CPU (no GPU)"
    ctx.row(f"loss, {where}, fp32", "PASS" if r["loss_rel"] < 1e-4 else "FAIL",
            f"relative difference {r['loss_rel']:.1e} (loss {r['loss_cpu']:.5f} nats/token; "
            f"batch {tuple(x0.shape)}, same x_t and t)", loss_rel=r["loss_rel"])
    ctx.row(f"gradients, {where}, fp32", "PASS" if r["grad_rel"] < 1e-3 else "FAIL",
            f"largest relative difference {r['grad_rel']:.1e} ({r['worst']}; {r['tensors']} tensors)",
            grad_rel=r["grad_rel"])
    method, net = md4_small(ctx, time_cond=False)
    c = cached_vs_ancestral(method, net, s["cached_num"], s["length"], s["cached_steps"], ctx.device)
    ctx.row(f"cached == ancestral ({ctx.device.type})", "PASS" if c["equal"] else "FAIL",
            f"{s['cached_num']} x {s['length']} tokens, {s['cached_steps']} steps: "
            + ("identical" if c["equal"] else f"{c['agree']:.2%} of tokens equal")
            + f" ({c['seconds']['ancestral']:.1f} s vs {c['seconds']['cached']:.1f} s)", **c)


def sec_tests(ctx: Context) -> None:
    if not ctx.cuda:
        raise Skip("no CUDA GPU: tests/test_cuda.py would skip every test")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=child_env())
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    ctx.detail(proc.stdout[-4000:])
    ctx.row("tests/test_cuda.py", "PASS" if proc.returncode == 0 and " passed" in summary else "FAIL", summary)


def sec_throughput(ctx: Context) -> None:
    args = ctx.model_args()
    bf16 = ctx.cuda
    _, net = gt.build(args, torch.device("meta"))
    flops = net.flops_per_token(args.length)
    peak = attained_tflops(ctx)
    log = []
    rows = gt.sweep(args, ctx.device, bf16, flops, peak, say=log.append)
    ctx.detail("\n".join(log))
    if not rows:
        ctx.row("eager, bf16" if bf16 else "eager, fp32", "FAIL", "not even a micro-batch of 1 fits")
        return
    best = max(rows, key=lambda r: r["tokens_s"])
    spec = flops * best["tokens_s"] / (SPEC_TFLOPS * 1e12)
    ctx.save("throughput", {"largest": rows[-1]["batch"], "best": best["batch"], "tokens_s": best["tokens_s"],
                            "flops_per_token": flops, "peak": peak})
    target = "meets" if best["mfu"] >= MFU_TARGET else "below"
    ctx.row(f"{'bf16' if bf16 else 'fp32'} training, eager, fused AdamW", "INFO",
            f"largest micro-batch {rows[-1]['batch']} ({rows[-1]['memory']} GiB peak); best at {best['batch']}: "
            f"{best['tokens_s']:,.0f} tokens/s, MFU {best['mfu']:.1%} of attained ({target} the {MFU_TARGET:.0%} "
            f"target), {spec:.1%} of {SPEC_TFLOPS:.0f} TFLOP/s; {net.num_params() / 1e6:.1f}M parameters, "
            f"{flops / 1e9:.3f} GFLOP/token", rows=rows, mfu_spec=spec)


# op-name fragments -> the category of time they stand for (first match wins)
CATEGORIES = [("attention", ("scaled_dot_product", "flash", "efficient_attention", "fmha", "attention")),
              ("matmul", ("mm", "matmul", "linear", "gemm", "cutlass", "xmma", "nvjet")),
              ("softmax / cross-entropy", ("softmax", "nll", "gather", "cross_entropy", "logsumexp")),
              ("layer norm", ("layer_norm",)),
              ("optimizer / EMA", ("adam", "foreach", "lerp", "clip", "vector_norm")),
              ("copies / casts", ("copy", "contiguous", "clone", "cat"))]


def category(op: str) -> str:
    name = op.lower()
    return next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "elementwise / other")


def op_times(prof, device_time: bool) -> list[tuple[str, float]]:
    """(operator, self time in us) of the profiled operators: their own GPU time (the kernels they
    launched; kernel entries are left out, they would count twice) or their own CPU time."""
    from torch.autograd import DeviceType

    def own(e) -> float:
        if not device_time:
            return e.self_cpu_time_total
        got = getattr(e, "self_device_time_total", None)
        return got if got is not None else getattr(e, "self_cuda_time_total", 0.0)

    averages = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    ops = [e for e in averages if getattr(e, "device_type", DeviceType.CPU) == DeviceType.CPU]
    events = [(e.key, float(own(e))) for e in ops]
    if device_time and not sum(us for _, us in events):  # a profiler that files kernel time elsewhere
        events = [(e.key, float(own(e))) for e in averages]
    return events


def sec_profile(ctx: Context) -> None:
    from torch.profiler import ProfilerActivity, profile

    batch = ctx.load("throughput", {}).get("best", 2)
    args = ctx.model_args()
    step = gt.training_step(args, ctx.device, batch, ctx.cuda)
    for _ in range(2):
        step()
    sync(ctx)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    steps = 3
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(ctx)
    wall = (time.perf_counter() - t0) / steps
    events = op_times(prof, ctx.cuda)
    total = sum(us for _, us in events) or 1.0
    shares: dict[str, float] = {}
    for op, us in events:
        shares[category(op)] = shares.get(category(op), 0.0) + us / total
    busy = total / 1e6 / steps / wall
    summary = ", ".join(f"{c} {v:.0%}" for c, v in sorted(shares.items(), key=lambda kv: -kv[1]) if v >= 0.005)
    top = sorted(events, key=lambda e: -e[1])[:12]
    ctx.detail(f"micro-batch {batch}, {steps} steps, {wall * 1e3:.1f} ms per step, "
               f"{'GPU' if ctx.cuda else 'CPU'} busy {busy:.0%} of the wall time\n"
               + "\n".join(f"{us / total:6.1%}  {us / 1e3 / steps:9.2f} ms/step  {op}" for op, us in top))
    ctx.row(f"one training step, micro-batch {batch}", "INFO",
            f"{wall * 1e3:.1f} ms/step, {'GPU' if ctx.cuda else 'CPU'} busy {busy:.0%} of it; {summary}",
            shares=shares, busy=busy)


def sec_compile(ctx: Context) -> None:
    if not ctx.cuda and not ctx.args.compile_cpu:
        raise Skip("on the CPU torch.compile takes longer than this tiny check (--compile-cpu to time it)")
    t = ctx.load("throughput")
    if not t:
        raise Skip("needs the throughput section's micro-batch")
    args = ctx.model_args(compile=True, warmup=max(ctx.size["warmup"], 2))
    for batch in (t["best"], max(t["best"] // 2, 1)):
        try:
            r = gt.time_training(args, ctx.device, batch, ctx.cuda)
            break
        except (RuntimeError, torch.OutOfMemoryError) as e:
            if not gt.is_oom(e):
                raise
            if ctx.cuda:
                torch.cuda.empty_cache()
    else:
        ctx.row("torch.compile", "FAIL", f"out of memory at micro-batch {t['best']} and half of it")
        return
    mfu = t["flops_per_token"] * r["tokens_s"] / (t["peak"] * 1e12)
    spec = t["flops_per_token"] * r["tokens_s"] / (SPEC_TFLOPS * 1e12)
    speed = r["tokens_s"] / t["tokens_s"] if batch == t["best"] else float("nan")
    peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f} GiB"
    ctx.row(f"{'bf16' if ctx.cuda else 'fp32'} training, torch.compile, micro-batch {batch}", "INFO",
            f"{r['tokens_s']:,.0f} tokens/s ({speed:.2f}x eager), MFU {mfu:.1%} of attained "
            f"({'meets' if mfu >= MFU_TARGET else 'below'} the {MFU_TARGET:.0%} target), {spec:.1%} of "
            f"{SPEC_TFLOPS:.0f}; compile + warm-up {r['warmup_s']:.0f} s; {peak}", **r, mfu=mfu, mfu_spec=spec)


def find_data(args) -> tuple[Path, Path]:
    """(plays.txt, gpt2.tiktoken) from the folders in the module docstring, or Skip."""
    roots = [Path(p) for p in (args.data_dir, os.environ.get("MD4_GPU_CHECK_DATA")) if p]
    roots += [ROOT / ".gpucheck", ROOT / "shared" / "data", ROOT.parent / "shared" / "data",
              ROOT.parent.parent / "shared" / "data"]

    def find(name: str, sub: str) -> Path | None:
        return next((r / d / name for r in roots for d in ("", sub) if (r / d / name).is_file()), None)

    plays, merges = find("plays.txt", "shakespeare"), find("gpt2.tiktoken", "tokenizers")
    if plays is None or merges is None:
        missing = " and ".join(n for n, p in (("plays.txt", plays), ("gpt2.tiktoken", merges)) if p is None)
        raise Skip(f"{missing} not found (give --data-dir; see bench/gpu_check.py)")
    return plays, merges


def sec_data(ctx: Context) -> None:
    from md4.data.prepare import prepare

    plays, merges = find_data(ctx.args)
    os.environ["MD4_GPT2_TIKTOKEN"] = str(merges)
    source = plays
    if "plays_chars" in ctx.size:  # tiny: the first characters, cut at a line end
        text = plays.read_text(encoding="utf-8")[: ctx.size["plays_chars"]]
        source = ctx.work / "plays-head.txt"
        source.write_text(text[: text.rfind("\n") + 1])
    t0 = time.perf_counter()
    meta = prepare([source], ctx.work / "plays-gpt2", valid=0.05, workers=min(8, os.cpu_count() or 1),
                   piece_chars=1 << 13, progress=False)
    tokens = {s: v["tokens"] for s, v in meta["splits"].items()}
    ctx.save("data", {"folder": str(ctx.work / "plays-gpt2"), "merges": str(merges), "tokens": tokens})
    ctx.row(f"{source.name} as GPT-2 BPE", "PASS" if tokens["train"] and tokens["valid"] else "FAIL",
            f"{meta['characters']:,} characters -> train {tokens['train']:,} / valid {tokens['valid']:,} tokens "
            f"({time.perf_counter() - t0:.1f} s)", tokens=tokens)


def corpus_or_skip(ctx: Context) -> str:
    d = ctx.load("data")
    if not d:
        raise Skip("needs the data section's BPE shards")
    os.environ["MD4_GPT2_TIKTOKEN"] = d["merges"]
    return d["folder"]


def train_sets(ctx: Context, corpus: str, **over) -> list[str]:
    """--set overrides for a short run on the plays: MD4-S (tiny: the tiny preset at length 64)."""
    s = ctx.size
    sets = {"data.corpus": corpus, "data.length": s["length"], "model.dim": s["dim"], "model.layers": s["layers"],
            "model.heads": s["heads"], "train.batch_size": s["train_batch"], "train.log_every": 10 if ctx.full else 1,
            "train.warmup": 100 if ctx.full else 2, "train.ema": 0.99 if ctx.full else 0.0,
            "train.eval_batches": 1, "train.keep": 1, "train.log": "[]"}
    if not ctx.full:
        sets["train.lr"] = 3e-3
    if not ctx.cuda:
        sets["train.threads"] = 1
    sets.update(over)
    return [f"{k}={v}" for k, v in sets.items()]


def metric(run: Path, key: str) -> tuple[list[float], int]:
    """The logged values of `key` in a run's metrics.jsonl, and the step of the last one."""
    path = run / "metrics.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    recs = [r for r in recs if key in r]
    return [r[key] for r in recs], (recs[-1]["step"] if recs else 0)


def sec_train(ctx: Context) -> None:
    import md4
    from md4.config import load_config
    from md4.evaluate import evaluate_model
    from md4.train import train

    corpus = corpus_or_skip(ctx)
    s = ctx.size
    minutes = s["train_minutes"]
    if ctx.full:  # what is left of this section's time, less a minute for start, eval and samples
        minutes = min(minutes, max(0.5, (ctx.args.section_deadline - time.time() - 60) / 60))
        largest = (ctx.load("throughput") or {}).get("largest", 32)
        steps, micro = 10**6, math.gcd(s["train_batch"], min(s["train_batch"], largest))
        sets = train_sets(ctx, corpus, **{"train.max_minutes": round(minutes, 2), "train.steps": steps,
                                           "train.micro_batch": micro, "train.eval_every": 10**6,
                                           "train.ckpt_every": 10**6})
        preset = "owt-md4-small"
    else:
        n = s["train_steps"]
        sets = train_sets(ctx, corpus, **{"train.steps": n, "train.eval_every": n, "train.ckpt_every": n})
        preset = "tiny"
    run = ctx.work / "train-run"
    t0 = time.perf_counter()
    train(load_config(preset, sets), run, progress=False)
    seconds = time.perf_counter() - t0
    loss, steps_done = metric(run, "loss_bpc")
    if not loss:
        raise RuntimeError(f"no training loss in {run / 'metrics.jsonl'}")
    k = max(2, len(loss) // 5)
    first, last = sum(loss[:k]) / len(loss[:k]), sum(loss[-k:]) / len(loss[-k:])
    tokens = steps_done * s["train_batch"] * s["length"]
    fell = last < (1 - s["loss_drop"]) * first
    ctx.row(f"{preset} on the plays ({seconds / 60:.1f} min)", "PASS" if fell else "FAIL",
            f"training loss {first:.2f} -> {last:.2f} bits/token (means of the first and last {k} of {len(loss)} "
            f"logged), {steps_done} steps, {tokens / seconds:,.0f} tokens/s overall", loss=loss, steps=steps_done)
    model = md4.load(run, device=ctx.device)
    r = evaluate_model(model, split="valid", limit=s["eval_limit"], batch_size=8, progress=False)
    ctx.row("md4 eval, valid split", "INFO", f"{r['bits_per_token']:.3f} ± {r['bits_per_token_se']:.3f} bits/token, "
            f"perplexity {r['perplexity']:,.1f} ({r['sequences']} sequences of {r['length']})", **r)
    t0 = time.perf_counter()
    texts = model.decode(model.sample(s["sample_show"], steps=s["sample_show_steps"], seed=0))
    ctx.detail("\n\n".join(f"--- sample {i}\n{t}" for i, t in enumerate(texts)))
    ctx.row(f"md4 sample, {s['sample_show_steps']} steps", "PASS" if all(texts) else "FAIL",
            f"{len(texts)} x {model.length} tokens in {time.perf_counter() - t0:.1f} s: "
            + json.dumps(texts[0][:90])[1:-1])


def sec_sampling(ctx: Context) -> None:
    from md4.sampling import sample

    s = ctx.size
    method, net = md4_small(ctx, time_cond=False)  # cached needs a network that ignores t
    net = net.to(ctx.device).eval()
    results = {}
    with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.cuda):
        for name in ("ancestral", "cached", "jump"):
            sample(method, net, 1, s["length"], steps=2, sampler=name, device=ctx.device)  # warm-up
            sync(ctx)
            t0 = time.perf_counter()
            sample(method, net, s["sample_num"], s["length"], steps=s["sample_steps"], sampler=name,
                   generator=torch.Generator(ctx.device).manual_seed(0), device=ctx.device)
            sync(ctx)
            results[name] = s["sample_num"] * s["length"] / (time.perf_counter() - t0)
    ctx.row(f"{s['sample_num']} x {s['length']} tokens, {s['sample_steps']} steps", "INFO",
            ", ".join(f"{n} {v:,.0f}" for n, v in results.items()) + " tokens/s", tokens_s=results)


def sec_distributed(ctx: Context) -> None:
    """DDP and FSDP2, each a few steps of `md4 train` under torchrun with one process, both at once."""
    corpus = corpus_or_skip(ctx)
    s = ctx.size
    procs = {}
    try:
        for mode in ("ddp", "fsdp"):
            sets = train_sets(ctx, corpus, **{"train.parallel": mode, "train.steps": s["dist_steps"],
                                              "train.batch_size": s["dist_batch"],
                                              "train.micro_batch": s["dist_batch"] // 2, "train.log_every": 1,
                                              "train.eval_every": s["dist_steps"], "train.ckpt_every": s["dist_steps"],
                                              "train.warmup": 2, "train.ema": 0.0})
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                   "-m", "md4", "train", "--config", "owt-md4-small" if ctx.full else "tiny",
                   "--out", str(ctx.work / f"{mode}-run"), "--quiet"] + [a for x in sets for a in ("--set", x)]
            log = open(ctx.work / f"{mode}.out", "w")
            procs[mode] = (subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=child_env()),
                           log, time.perf_counter())
        losses = {}
        for mode, (proc, log, t0) in procs.items():
            proc.wait()
            log.close()
            losses[mode] = distributed_row(ctx, mode, proc.returncode, time.perf_counter() - t0)
        if all(losses.values()):
            a, b = losses["ddp"][0], losses["fsdp"][0]
            ctx.row("first loss, FSDP vs DDP", "PASS" if abs(a - b) <= 2e-2 * abs(a) else "FAIL",
                    f"{b:.4f} vs {a:.4f} bits/token (same seed and batch; bf16 on a GPU)")
    finally:
        for proc, log, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


def distributed_row(ctx: Context, mode: str, returncode: int, seconds: float) -> list[float]:
    """The row of one torchrun training; its logged losses ([] when it failed)."""
    run, s = ctx.work / f"{mode}-run", ctx.size
    loss, _ = metric(run, "loss_bpc")
    check = f"torchrun, 1 process, {mode}"
    if returncode != 0:
        out = (ctx.work / f"{mode}.out").read_text(errors="replace")
        ctx.detail(f"{mode}:\n{out[-3000:]}")
        ctx.row(check, "FAIL", f"exit status {returncode}: {(out.strip().splitlines() or ['no output'])[-1][:160]}")
        return []
    ok = len(loss) == s["dist_steps"] and all(math.isfinite(v) for v in loss) and (run / "model").is_dir()
    ctx.row(check, "PASS" if ok else "FAIL",
            f"{len(loss)} steps of 2 micro-batches of {s['dist_batch'] // 2}, loss {loss[0]:.2f} -> {loss[-1]:.2f}, "
            f"model saved, {seconds:.0f} s" if loss else "no loss logged", loss=loss)
    return loss if ok else []


@dataclass(frozen=True)
class Section:
    run: Callable[[Context], None]
    limit: float  # seconds on the GPU (the tiny CPU run scales it down)
    background: bool = False  # with --isolate: runs alongside the sections after it (GPU-light work)


SECTIONS: dict[str, Section] = {
    "device": Section(sec_device, 60),
    "numerics": Section(sec_numerics, 90),
    "throughput": Section(sec_throughput, 150),
    "profile": Section(sec_profile, 60),
    "compile": Section(sec_compile, 180),
    "data": Section(sec_data, 90),
    "tests": Section(sec_tests, 240, background=True),  # mostly CPU work: during the 3-minute training
    "train": Section(sec_train, 260),
    "sampling": Section(sec_sampling, 90),
    "distributed": Section(sec_distributed, 150),
}


# ----------------------------------------------------------------------------- running sections
def child_env() -> dict:
    src = str(ROOT / "src")
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": src + (os.pathsep + path if path else ""), "PYTHONUNBUFFERED": "1"}


def inject(name: str) -> None:
    """MD4_GPU_CHECK_INJECT="numerics=error,sampling=hang": fail or hang a section (tests of this
    script); "freeze" hangs deaf to SIGALRM, as a process stuck inside a GPU call."""
    for item in filter(None, os.environ.get("MD4_GPU_CHECK_INJECT", "").split(",")):
        section, _, what = item.partition("=")
        if section == name and what == "error":
            raise RuntimeError(f"injected error in {name}")
        if section == name and what in ("hang", "freeze"):
            if what == "freeze":
                signal.signal(signal.SIGALRM, signal.SIG_IGN)
            time.sleep(3600)


def run_here(ctx: Context, name: str, limit: float, budget: float | None = None) -> None:
    """Run one section in this process for at most `limit` seconds (SIGALRM), its exceptions and
    a timeout turned into rows (`budget`: the section's whole limit, for the message)."""
    ctx.section = name

    def alarm(signum, frame):
        raise SectionTimeout()

    old = signal.signal(signal.SIGALRM, alarm) if hasattr(signal, "SIGALRM") else None
    if old is not None:
        signal.setitimer(signal.ITIMER_REAL, max(limit, 0.01))
    try:
        inject(name)
        SECTIONS[name].run(ctx)
    except Skip as e:
        ctx.row("-", "SKIP", str(e))
    except SectionTimeout:
        ctx.row("-", "TIMEOUT", f"stopped at its limit of {budget or limit:.0f} s")
    except Exception as e:  # every failure is a row; the next section runs
        lines = traceback.format_exception_only(type(e), e)[-1].strip()
        ctx.row("-", "ERROR", lines[:300])
        ctx.detail(traceback.format_exc()[-3000:])
    finally:
        if old is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        if ctx.cuda:
            torch.cuda.empty_cache()


@dataclass
class Job:
    """A section running in its own process."""

    name: str
    proc: subprocess.Popen
    log: object
    limit: float
    grace: float
    log_started: float = field(default_factory=time.time)


def start_isolated(ctx: Context, name: str, limit: float, grace: float = 10.0) -> Job:
    """Start one section in a child process (a fresh CUDA context; a hang or a crash is its own):
    it stops itself after `limit` seconds (SIGALRM), and `finish` kills it with its process group
    `grace` seconds later if it has not (a hang inside a GPU call)."""
    a = ctx.args
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-section", name, "--work", str(ctx.work),
           "--device", str(ctx.device), "--section-deadline", str(time.time() + limit), "--section-seconds",
           str(limit)]
    cmd += ["--tiny"] * a.tiny + ["--full"] * a.full + ["--compile-cpu"] * a.compile_cpu
    cmd += (["--data-dir", a.data_dir] if a.data_dir else []) + [x for kv in a.size for x in ("--size", kv)]
    log = open(ctx.work / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=child_env(),
                            start_new_session=True)
    return Job(name, proc, log, limit, grace)


def finish(ctx: Context, job: Job) -> None:
    """Wait for a section's process (killing it after its limit and grace) and add a row for a
    kill or a crash that left none."""
    try:
        job.proc.wait(timeout=max(job.limit + job.grace - (time.time() - job.log_started), 0.1))
    except subprocess.TimeoutExpired:
        os.killpg(job.proc.pid, signal.SIGKILL)
        job.proc.wait()
    finally:
        job.log.close()
    rows = section_rows(ctx.work, job.name)
    ctx.section = job.name
    if job.proc.returncode == -signal.SIGKILL and not any(r["status"] == "TIMEOUT" for r in rows):
        ctx.row("-", "TIMEOUT", f"killed {job.grace:.0f} s after its limit of {job.limit:.0f} s"
                + (f" ({len(rows)} row(s) before)" if rows else ""))
    elif job.proc.returncode != 0 and not rows:
        tail = (ctx.work / f"{job.name}.log").read_text(errors="replace").strip().splitlines() or ["no output"]
        ctx.row("-", "ERROR", f"exit status {job.proc.returncode}: {tail[-1][:300]}")


def section_rows(work: Path, name: str) -> list[dict]:
    path = work / f"rows-{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def collect(ctx: Context, jobs: list, seconds: dict, wait: bool) -> list:
    """Finish the background jobs that have ended (all of them with `wait`); the others remain."""
    left = []
    for job, t0 in jobs:
        if wait or job.proc.poll() is not None:
            finish(ctx, job)
            seconds[job.name] = time.time() - t0
            report(ctx.work, job.name, seconds[job.name])
        else:
            left.append((job, t0))
    return left


def report(work: Path, name: str, seconds: float) -> None:
    statuses = ", ".join(r["status"] for r in section_rows(work, name))
    print(f"[gpu_check] {name}: {statuses} ({seconds:.1f} s)", file=sys.stderr, flush=True)


def table(rows: list[dict]) -> str:
    cells = [[r["section"], r["check"], r["status"], str(r["result"]).replace("|", "/"),
              f"{r.get('seconds', 0):.1f}"] for r in rows]
    return "\n".join(["| section | check | status | result | s |", "|---|---|---|---|---|"]
                     + ["| " + " | ".join(c) + " |" for c in cells])


def sizes(args) -> dict:
    """TINY or FULL with the --size overrides (numbers)."""
    size = dict(TINY if args.tiny else FULL)
    for kv in args.size:
        key, _, value = kv.partition("=")
        if key not in size:
            raise SystemExit(f"gpu_check: unknown size {key!r}; choose from {', '.join(size)}")
        size[key] = type(size[key])(float(value)) if isinstance(size[key], int) else float(value)
    return size


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes (the default without CUDA)")
    p.add_argument("--full", action="store_true", help="the GPU's recipe even without CUDA (with --size, to try it "
                                                       "on a CPU)")
    p.add_argument("--size", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a size, e.g. train_minutes=1; keys: {', '.join(FULL)}")
    p.add_argument("--device", default="auto")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, of: " + ", ".join(SECTIONS))
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each section in its own process (default: on a GPU)")
    p.add_argument("--section-limit", type=float, default=0, help="seconds for every section (0 = its own)")
    p.add_argument("--deadline", type=float, default=0, help="seconds for the whole check (0 = 470 on a GPU)")
    p.add_argument("--data-dir", help="folder with plays.txt and gpt2.tiktoken")
    p.add_argument("--work", help="working folder (default: a temporary one)")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--compile-cpu", action="store_true", help="time torch.compile on the CPU too")
    p.add_argument("--grace", type=float, default=10.0, help="seconds a section's process gets after its limit "
                                                             "before it is killed (--isolate)")
    p.add_argument("--run-section", help=argparse.SUPPRESS)  # internal: one section, in a child process
    p.add_argument("--section-deadline", type=float, default=0, help=argparse.SUPPRESS)
    p.add_argument("--section-seconds", type=float, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from md4.build import resolve_device

    device = resolve_device(args.device)
    args.tiny = args.tiny or (device.type != "cuda" and not args.full)
    size = sizes(args)
    if device.type == "cpu":  # tiny work: one thread (a second one spin-waits on a shared machine)
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
    if args.run_section:  # a child process: one section, rows appended to the shared file
        ctx = Context(args, device, size, Path(args.work))
        run_here(ctx, args.run_section, max(args.section_deadline - time.time(), 1.0), args.section_seconds)
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="md4-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    for old in [*work.glob("rows-*.jsonl"), *work.glob("details-*.txt"), *work.glob("*.json")]:
        old.unlink()  # a previous check's rows and state, in a --work folder used again
    for folder in ("plays-gpt2", "train-run", "ddp-run", "fsdp-run"):
        shutil.rmtree(work / folder, ignore_errors=True)
    ctx = Context(args, device, size, work)
    isolate = args.isolate if args.isolate is not None else device.type == "cuda"
    scale = 1.0 if device.type == "cuda" else 0.25
    start = time.time()
    deadline = start + (args.deadline or size["deadline"])
    names = args.sections.split(",")
    seconds, background = {}, []
    for name in names:
        left = deadline - time.time()
        limit = min(args.section_limit or SECTIONS[name].limit * scale, left)
        t0 = time.time()
        ctx.section = name
        if left < 5:
            ctx.row("-", "SKIP", f"no time left before the {deadline - start:.0f} s deadline")
        elif isolate and SECTIONS[name].background:
            print(f"[gpu_check] {name} started alongside the next sections (limit {limit:.0f} s)",
                  file=sys.stderr, flush=True)
            background.append((start_isolated(ctx, name, limit, args.grace), t0))
            continue
        else:
            print(f"[gpu_check] {name} (limit {limit:.0f} s) ...", file=sys.stderr, flush=True)
            args.section_deadline = time.time() + limit
            if isolate:
                finish(ctx, start_isolated(ctx, name, limit, args.grace))
            else:
                run_here(ctx, name, limit)
        seconds[name] = time.time() - t0
        report(work, name, seconds[name])
        background = collect(ctx, background, seconds, wait=False)
    collect(ctx, background, seconds, wait=True)
    rows = [{**r, "seconds": seconds.get(n, 0.0)} for n in names for r in section_rows(work, n)]
    ctx.rows = rows
    print(f"\n# gpu_check: {ctx.load('device', {}).get('name', device)}, torch {torch.__version__}, "
          f"{'tiny' if args.tiny else 'full'} sizes, {time.time() - start:.0f} s\n")
    print(table(ctx.rows))
    details = "".join((work / f"details-{n}.txt").read_text() for n in names if (work / f"details-{n}.txt").is_file())
    if details:
        print("\n" + details)
    if args.json:
        Path(args.json).write_text(json.dumps(ctx.rows, indent=1, default=str))
    bad = [r for r in ctx.rows if r["status"] in BAD]
    print(f"RESULT {json.dumps({'bad': len(bad), 'rows': len(ctx.rows)})}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
