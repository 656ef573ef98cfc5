"""Sampling speed: network calls, time per sample and samples/s of the ancestral, cached and jump
samplers, side by side in one run, for several numbers of steps T and both time grids.

    python bench/sampling_speed.py runs/demo                # T = 64, 256, 1024, 4096; cosine and uniform grids
    python bench/sampling_speed.py --tiny                   # an untrained tiny network, a few seconds

For each (grid, T) every sampler draws the same `--num` samples from the same seed; `cached` must
return exactly the `ancestral` samples (checked, column "= anc."; `jump` has the same law as
`ancestral` but other random draws, so "no" is expected there). "calls" counts denoiser calls
(each on a batch), "evals/sample" the rows the network evaluated per sample (a cached call
evaluates only the samples that changed). The unigram entropy of the samples (bits per token)
is printed with the data's: a sampler that lost diversity shows up there. "other load" is the CPU
time other processes used during the row, in cores (/proc/stat): on the shared 2-core machine a
row with other load above ~0.1 does not time this code alone.

With `--judge NAME` (for example `--judge smollm2`, needs `pip install "md4[judge]"`) a second
table scores `--judge-num` samples per (grid, T) with the judge LM: generative perplexity, the
judge's bits per character of the decoded text and the samples' unigram entropy, plus the same
for as many chunks of real validation text. These samples come from `jump`, which has exactly
the law of `ancestral` on the same grid and is the fastest at large T.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

import md4
from md4.nn import Transformer
from md4.sampling import GRIDS, SAMPLERS, sample
from train_throughput import busy_cpu_seconds, own_cpu_seconds


class Counting:
    """The network with a count of its calls and of the rows (samples) it evaluated."""

    def __init__(self, net):
        self.net, self.calls, self.rows = net, 0, 0
        self.uses_time = net.uses_time  # lets `cached` detect that t is ignored

    def __call__(self, x, t):
        self.calls += 1
        self.rows += x.shape[0]
        return self.net(x, t)


def unigram_entropy(x: torch.Tensor, vocab_size: int) -> float:
    """Entropy in bits of the token frequencies of x (any shape)."""
    p = torch.bincount(x.flatten().long(), minlength=vocab_size).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())


def load(args):
    if args.tiny:
        torch.manual_seed(0)
        net = Transformer(27, dim=64, layers=2, heads=2, time_cond=False, max_len=args.length).eval()
        return md4.MD4(27, "linear"), net, None, None
    model = md4.load(args.path)
    data = None
    try:
        from md4.data import load_corpus

        data = load_corpus(model.config.data.corpus).split("valid")
    except md4.UserError:
        pass
    return model.method, model.net, data, model


def judge_table(args, model, diffusion, net, data) -> list[dict]:
    """Generative perplexity and entropy of `--judge-num` jump samples per (grid, T), and of real text."""
    from md4.judge import Judge, generative_perplexity

    judge = Judge.load(args.judge)
    print(f"\n# judge {judge.name}: {args.judge_num} samples of length {args.length} per row (sampler jump)")
    print("| grid | T | gen ppl | judge bits/char | entropy bits ± SE | sampling s |\n|---|---|---|---|---|---|")
    rows = []

    def row(grid, T, x, seconds):
        r = generative_perplexity(judge, model.decode(x), ids=x.cpu())
        r = {"grid": grid, "steps": T, "sampling_seconds": seconds, **r}
        rows.append(r)
        print(f"| {grid} | {T} | {r['gen_ppl']:.1f} | {r['judge_bits_per_char']:.3f} | "
              f"{r['entropy_bits']:.3f} ± {r['entropy_bits_se']:.3f} | {seconds:.1f} |", flush=True)

    for grid in args.grids:
        for T in args.steps:
            t0 = time.perf_counter()
            x = sample(diffusion, net, args.judge_num, args.length, steps=T, grid=grid, sampler="jump",
                       generator=torch.Generator().manual_seed(args.seed + 1))
            row(grid, T, x, time.perf_counter() - t0)
    if data is not None:
        g = torch.Generator().manual_seed(args.seed)
        starts = torch.randint(0, len(data) - args.length, (args.judge_num,), generator=g).tolist()
        x = torch.stack([torch.from_numpy(data[s:s + args.length].astype("int64")) for s in starts])
        row("real text", "-", x, 0.0)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("path", nargs="?", help="run or model folder")
    p.add_argument("--tiny", action="store_true", help="an untrained tiny network, T = 16, 64")
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--num", type=int, default=8, help="samples per run (one batch)")
    p.add_argument("--steps", type=int, nargs="+", default=[64, 256, 1024, 4096])
    p.add_argument("--grids", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    p.add_argument("--samplers", nargs="+", default=["ancestral", "cached", "jump"], choices=list(SAMPLERS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--judge", help="also score samples with this judge LM (e.g. smollm2)")
    p.add_argument("--judge-num", type=int, default=32, help="samples per (grid, T) for the judge")
    p.add_argument("--skip-speed", action="store_true", help="only the judge table")
    args = p.parse_args(argv)
    if args.tiny:
        args.length, args.steps, args.num = 32, [16, 64], 4
    elif not args.path:
        p.error("give a run folder, or --tiny")
    torch.set_num_threads(args.threads)
    diffusion, net, data, model = load(args)
    if args.judge and model is None:
        p.error("--judge needs a trained model folder")
    V = diffusion.vocab_size
    print(f"# sampling speed: length {args.length}, {args.num} samples per batch, {args.threads} threads, "
          f"torch {torch.__version__}")
    if data is not None:
        print(f"# data unigram entropy (valid split): {unigram_entropy(torch.from_numpy(data.astype('int64')), V):.3f} bits")
    sample(diffusion, net, 1, args.length, steps=2)  # warm-up
    rows, header = [], ("| grid | T | sampler | calls | evals/sample | s/sample | samples/s | speed-up | = anc. "
                        "| entropy bits | other load |\n|---|---|---|---|---|---|---|---|---|---|---|")
    if not args.skip_speed:
        print(header)
    for grid in args.grids:
        for T in args.steps:
            if args.skip_speed:
                break
            base = None
            for name in args.samplers:
                counted = Counting(net)
                busy0, own0, t0 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
                x = sample(diffusion, counted, args.num, args.length, steps=T, grid=grid, sampler=name,
                           generator=torch.Generator().manual_seed(args.seed))
                seconds = time.perf_counter() - t0
                other = max((busy_cpu_seconds() - busy0) - (own_cpu_seconds() - own0), 0.0) / seconds
                if name == "ancestral":
                    base = (x, seconds)
                same = "-" if base is None or name == "ancestral" else ("yes" if torch.equal(x, base[0]) else "no")
                r = {"grid": grid, "steps": T, "sampler": name, "calls": counted.calls,
                     "evals_per_sample": counted.rows / args.num, "seconds_per_sample": seconds / args.num,
                     "samples_per_second": args.num / seconds, "speedup": (base[1] / seconds) if base else math.nan,
                     "same_as_ancestral": same, "entropy_bits": unigram_entropy(x, V), "other_load": other}
                rows.append(r)
                print(f"| {grid} | {T} | {name} | {r['calls']} | {r['evals_per_sample']:.1f} | "
                      f"{r['seconds_per_sample']:.3f} | {r['samples_per_second']:.2f} | {r['speedup']:.2f}x | {same} | "
                      f"{r['entropy_bits']:.3f} | {other:.2f} |", flush=True)
    judged = judge_table(args, model, diffusion, net, data) if args.judge else []
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"speed": rows, "judge": judged} if args.judge else rows, f, indent=1)


if __name__ == "__main__":
    main()
