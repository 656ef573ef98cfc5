"""MD4 against the autoregressive baseline on MOSES molecules (issue 18): the same backbone,
data, seed and training time; test NELBO per molecule and per character, and RDKit metrics of
samples (validity, uniqueness, novelty against the training SMILES, internal diversity, FCD
when the `fcd` package is installed), plus MD4's scaffold infilling.

    # the real comparison (about 2 x 20 minutes of training, then sampling): run on the shared CPU
    flock /work/cpu.lock python bench/moses_compare.py --out runs/moses --minutes 20
    # a smoke test in about a minute
    python bench/moses_compare.py --out /tmp/moses-tiny --tiny

Needs RDKit and the MOSES data: pip install rdkit && pip install --no-deps molsets.
Resumable: a finished run is not retrained (an interrupted one resumes from its checkpoint),
samples already drawn (RUN/samples.txt) are reused. Writes OUT/moses.json and OUT/moses.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import md4
from md4.evaluate import evaluate_model
from md4.config import load_config
from md4.data import load_corpus
from md4.molecules import fill_template, molecule_metrics, scaffold_kept
from md4.train import train_unless_done

TINY = ["model.dim=32", "model.layers=2", "model.heads=2", "model.cond_dim=16", "train.steps=30",
        "train.batch_size=16", "train.eval_every=30", "train.ckpt_every=30", "train.log_every=10", "train.warmup=5"]
TEMPLATE, SCAFFOLD = "O=C(N*)c1ccc(*)cc1", "O=C(N)c1ccccc1"  # a benzamide with two side chains to fill


def draw(model, num: int, steps: int, batch: int, path: Path) -> tuple[list[str], float]:
    """`num` decoded samples, drawn in batches and appended to `path` (reused when it exists), and
    the sampling seconds per sample: the time of every batch drawn, kept in path.seconds.json, so
    that a re-run that reuses samples reports the time they took."""
    done = path.read_text().splitlines() if path.exists() else []
    clock = path.with_suffix(".seconds.json")
    timed = json.loads(clock.read_text()) if clock.exists() else {"samples": 0, "seconds": 0.0}
    with open(path, "a") as f:
        while len(done) < num:
            k = min(batch, num - len(done))
            t0 = time.time()
            x = model.sample(k, steps=steps, seed=len(done))
            timed = {"samples": timed["samples"] + k, "seconds": timed["seconds"] + time.time() - t0}
            for s in model.decode(x):
                f.write(s + "\n")
                done.append(s)
            f.flush()
            clock.write_text(json.dumps(timed) + "\n")
    return done[:num], timed["seconds"] / max(timed["samples"], 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/moses")
    p.add_argument("--methods", nargs="+", default=["md4", "ar"])
    p.add_argument("--minutes", type=float, default=20, help="training time of each method")
    p.add_argument("--num", type=int, default=2000, help="samples per method for the metrics")
    p.add_argument("--steps", type=int, default=100, help="MD4 sampling steps")
    p.add_argument("--eval-limit", type=int, default=5000, help="test molecules for the NELBO")
    p.add_argument("--infill", type=int, default=200, help="MD4 scaffold completions")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="a tiny model, a few steps and samples (a smoke test)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if args.tiny:
        args.num, args.steps, args.eval_limit, args.infill = 40, 10, 200, 16
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows, corpora = [], {}
    for method in args.methods:
        sets = (TINY if args.tiny else []) + args.set + [f"method={method}", f"train.max_minutes={args.minutes}",
                                                         f"train.threads={args.threads}"]
        cfg = load_config("moses", sets)
        run = out / method
        train_unless_done(cfg, run)
        torch.set_num_threads(args.threads)
        model = md4.load(run)
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        ev = evaluate_model(model, "test", limit=args.eval_limit, progress=False)
        samples, per_sample = draw(model, args.num, args.steps, 250, run / "samples.txt")
        key = (cfg.data.corpus, cfg.data.length)
        if key not in corpora:  # the same data for every method: decoded once
            corpus = load_corpus(*key[:1], min_length=key[1])
            corpora[key] = corpus.records("train"), corpus.records("test")[:10000]
        train_smiles, test_smiles = corpora[key]
        row = {"method": method, "steps": max(r["step"] for r in metrics),
               "train_minutes": max(r.get("seconds", 0) for r in metrics) / 60,
               "test_bits_per_molecule": ev["bits_per_record"], "test_bits_per_molecule_se": ev["bits_per_record_se"],
               "test_bits_per_char": ev["bits_per_real_token"], "test_bits_per_char_se": ev["bits_per_real_token_se"],
               "bound": ev["bound"], "sampling_seconds": per_sample * len(samples), "sampling_steps": args.steps,
               **molecule_metrics(samples, reference=train_smiles, fcd_reference=test_smiles)}
        if method != "ar" and args.infill:
            filled = fill_template(model, TEMPLATE, args.infill, max_gap=4, steps=args.steps)
            m = molecule_metrics(filled)
            row.update(infill_valid=m["valid"], infill_unique=m["unique"], infill_scaffold=scaffold_kept(filled, SCAFFOLD))
            (run / "infill.txt").write_text("".join(s + "\n" for s in filled))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    (out / "moses.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = table_md(rows)
    (out / "moses.md").write_text(table + "\n")
    print(table)
    return 0


def table_md(rows: list[dict]) -> str:
    def f(r, k, d=3):
        v = r.get(k)
        return "-" if v is None else f"{v:.{d}f}"

    lines = ["| method | steps | train min | test bits/molecule ± SE | bits/char ± SE | bound | valid | unique | "
             "novel | IntDiv | FCD | infill valid / scaffold kept | samples (s to draw) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        infill = f"{f(r, 'infill_valid')} / {f(r, 'infill_scaffold')}" if "infill_valid" in r else "- (prefix only)"
        lines.append(f"| {r['method']} | {r['steps']} | {r['train_minutes']:.1f} | {f(r, 'test_bits_per_molecule', 2)} ± "
                     f"{f(r, 'test_bits_per_molecule_se', 2)} | {f(r, 'test_bits_per_char', 4)} ± "
                     f"{f(r, 'test_bits_per_char_se', 4)} | {r['bound']} | {f(r, 'valid')} | {f(r, 'unique')} | "
                     f"{f(r, 'novel')} | {f(r, 'int_div')} | {'missing' if 'fcd_missing' in r else f(r, 'fcd', 2)} | {infill} | {r['samples']} ({r['sampling_seconds']:.1f}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
