"""Compare two trained models on the same held-out chunks: bpc ± SE of each and of the paired difference.

    python bench/paired_eval.py RUN_A RUN_B [--split test] [--mc-samples 2] [--threads 2] [--json]

Each model gets the NELBO of every non-overlapping chunk of the split (as `md4 eval`: K stratified
draws of t per chunk, fp32, EMA weights, same seed). The difference B - A is taken chunk by chunk,
so its standard error excludes the chunk-to-chunk spread that both models share (issue 3: GenMD4
against MD4).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

import md4
from md4.data import eval_chunks, load_corpus
from md4.data.corpus import SPLITS
from md4.evaluate import sequence_nelbo, summarize


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--split", default="test", choices=[s for s in SPLITS if s != "train"])
    p.add_argument("--mc-samples", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out, per_seq = {}, {}
    for name in (args.a, args.b):
        model = md4.load(name)
        chunks = eval_chunks(load_corpus(model.config.data.corpus, min_length=model.length).split(args.split), model.length)
        t0 = time.time()
        per_seq[name] = sequence_nelbo(model.method, model.net, chunks, mc_samples=args.mc_samples,
                                       seed=args.seed, progress=not args.json)
        out[name] = {**summarize(per_seq[name], model.length), "method": model.config.method,
                     "seconds": round(time.time() - t0, 1)}
    diff = (per_seq[args.b] - per_seq[args.a]) / (out[args.a]["length"] * math.log(2))
    out["b_minus_a_bits_per_token"] = diff.mean().item()
    out["b_minus_a_se"] = (diff.std() / math.sqrt(len(diff))).item()
    if args.json:
        print(json.dumps(out))
        return
    for name in (args.a, args.b):
        r = out[name]
        print(f"{name} ({r['method']}): {r['bits_per_token']:.4f} ± {r['bits_per_token_se']:.4f} bits/token "
              f"({r['sequences']} chunks of {r['length']}, {args.split}, {args.mc_samples} draws of t each, {r['seconds']} s)")
    print(f"difference {args.b} - {args.a}: {out['b_minus_a_bits_per_token']:+.4f} ± {out['b_minus_a_se']:.4f} "
          f"bits/token (paired, same chunks)")


if __name__ == "__main__":
    main()
