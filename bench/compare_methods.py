"""Train several methods with identical settings and compare them: test bits/char ± SE, training
time, and sample quality (generative perplexity under a judge LM, unigram entropy).

    flock /work/cpu.lock python bench/compare_methods.py --methods ar sedd md4 \\
        --set train.steps=600 --set train.max_minutes=0 --set train.threads=2 --out /work/wt/runs-eval

Every method gets the same preset, overrides, network, data, seed and number of training tokens;
only `method=` differs. A run folder that already holds a finished model is not retrained, so a
new method (e.g. genmd4) can be added later with the same command and appears in the same table.
For md4 the discrete-time bound with T=1000 (= D3PM-absorb) is reported as an extra row.
Writes OUT/compare.json and OUT/compare.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import md4
from md4.config import load_config
from md4.evaluate import evaluate_model, reference_quality, sample_quality
from md4.train import train_unless_done


def training_seconds(run: Path) -> float:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return max((r["seconds"] for r in recs if "seconds" in r), default=float("nan"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["ar", "sedd", "md4"])
    p.add_argument("--config", default="demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--mc-samples", type=int, default=4, help="draws of t per test sequence (diffusion methods)")
    p.add_argument("--judge", default="smollm2")
    p.add_argument("--num", type=int, default=64, help="samples scored by the judge")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the config's)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows, judge = [], None
    if args.judge:
        from md4.judge import Judge

        judge = Judge.load(args.judge)
    for method in args.methods:
        cfg = load_config(args.config, args.set + [f"method={method}"])
        run = out / method
        train_unless_done(cfg, run)
        torch.set_num_threads(args.threads)
        model = md4.load(run)
        tokens = cfg.train.steps * cfg.train.batch_size * cfg.data.length
        base = {"method": method, "train_minutes": training_seconds(run) / 60, "train_tokens": tokens,
                "params": model.net.num_params()}
        evals = [evaluate_model(model, "test", mc_samples=args.mc_samples, progress=False)]
        if method == "md4":
            evals.append(evaluate_model(model, "test", mc_samples=args.mc_samples, timesteps=1000, progress=False))
        quality = sample_quality(model, judge, args.num, args.steps, progress=False) if judge else {}
        for e in evals:
            name = method if e["timesteps"] == 0 else f"{method} T={e['timesteps']} (D3PM-absorb)"
            rows.append({**base, **e, "name": name, "quality": quality if e is evals[0] else {}})
        print(f"== {method}: {evals[0]['bits_per_token']:.4f} ± {evals[0]['bits_per_token_se']:.4f} bpc", file=sys.stderr)
    reference = reference_quality(model, judge, args.num) if judge else {}
    (out / "compare.json").write_text(json.dumps({"rows": rows, "reference": reference, "argv": sys.argv,
                                                  "date": time.strftime("%Y-%m-%d")}, indent=1))
    table = markdown(rows, reference)
    (out / "compare.md").write_text(table + "\n")
    print(table)
    return 0


def markdown(rows: list[dict], reference: dict) -> str:
    lines = ["| method | test bpc ± SE | bound | K | params | train tokens | train min | gen ppl | judge bits/char "
             "| entropy (bits) ± SE | sampling steps |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q = r["quality"]
        qcols = (f"{q['gen_ppl']:.1f} | {q['judge_bits_per_char']:.3f} | {q['entropy_bits']:.3f} ± "
                 f"{q['entropy_bits_se']:.3f} | {q['steps']}") if q else " |  |  | "
        lines.append(f"| {r['name']} | {r['bits_per_token']:.4f} ± {r['bits_per_token_se']:.4f} | {r['bound']} | "
                     f"{r['mc_samples']} | {r['params'] / 1e6:.2f}M | {r['train_tokens'] / 1e6:.2f}M | "
                     f"{r['train_minutes']:.1f} | {qcols} |")
    if reference:
        q = reference
        lines.append(f"| real test text | | | | | | | {q['gen_ppl']:.1f} | {q['judge_bits_per_char']:.3f} | "
                     f"{q['entropy_bits']:.3f} ± {q['entropy_bits_se']:.3f} | |")
    judge = (rows[0]["quality"] or {}).get("judge") or reference.get("judge")
    if judge:
        lines.append(f"\nJudge: {judge}; {reference.get('samples', '')} samples per method.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
