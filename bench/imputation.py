"""Imputation on a real table (issue 18): MD4 against the autoregressive baseline (the same
backbone, data, seed and training time) and the per-column majority, on held-out rows with a
fraction of their cells hidden at random.

    # the table: Debian's r-cran-modeldata (apt-get download r-cran-modeldata; dpkg-deb -x it)
    R=x/usr/lib/R/site-library/modeldata/data
    # the comparison (2 x 10 minutes of training at one thread, then imputation), on the shared CPU
    flock /work/cpu.lock python bench/imputation.py --table $R --object ames --out runs/ames --minutes 10
    # a smoke test in about a minute
    python bench/imputation.py --table $R --object credit_data --out /tmp/imp-tiny --tiny

The held-out rows are the valid and test splits (never trained on; valid only reports a loss
during training, nothing is selected with it). In each, every non-missing cell is hidden with
probability --hide; each method fills the hidden cells of a row given its other cells
(md4.data.tables.impute_report): MD4 by infilling (the mode of --draws completions, one sampling
step per column), AR by drawing the hidden cells left to right with the observed ones teacher-
forced, either unweighted ("ar-prefix": each cell sees only the cells before it) or importance-
weighted by the likelihood of the observed cells after it ("ar-weighted"), at the same cost (one
network call per column per draw). Resumable: a finished run is not retrained. Writes
OUT/imputation.json and OUT/imputation.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import md4
from md4.config import load_config
from md4.data import load_corpus
from md4.data.tables import META, hide_cells, impute_report, is_table, prepare_table
from md4.train import train_unless_done

MODEL = ["model.dim=128", "model.layers=3", "model.heads=4", "model.mlp_ratio=4.0", "model.cond_dim=64",
         "model.dropout=0.1", "model.time_cond=false", "train.batch_size=64", "train.lr=1e-3", "train.warmup=200",
         "train.min_lr_ratio=0.05", "train.weight_decay=0.01", "train.ema=0.999", "train.steps=1000000",
         "train.eval_every=500", "train.ckpt_every=500", "train.log_every=50", "train.eval_batches=4"]
TINY = ["model.dim=32", "model.layers=2", "model.heads=2", "model.cond_dim=16", "train.steps=40", "train.warmup=5",
        "train.eval_every=20", "train.ckpt_every=20", "train.log_every=10", "train.max_minutes=0"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", required=True, help="a CSV file or R data (a package's data folder, .rda, .rds)")
    p.add_argument("--object", help="the R object (data frame)")
    p.add_argument("--bins", type=int, default=8)
    p.add_argument("--out", default="runs/imputation")
    p.add_argument("--methods", nargs="+", default=["md4", "ar"])
    p.add_argument("--minutes", type=float, default=10, help="training time of each method")
    p.add_argument("--hide", type=float, default=0.3)
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="a tiny model and a few steps (a smoke test)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = out / "table"
    if not is_table(data):
        prepare_table(args.table, data, name=args.object, bins=args.bins)
    meta = json.loads((data / META).read_text())
    n = len(meta["columns"])
    report = {"table": args.table, "object": args.object, "columns": n, "splits": meta["splits"], "hide": args.hide,
              "draws": args.draws, "methods": {}, "runs": {}}
    for method in args.methods:
        sets = MODEL + [f"train.max_minutes={args.minutes}"] + (TINY if args.tiny else []) + args.set + [
            f"method={method}", f"train.threads={args.threads}", f"data.corpus={data}", f"data.length={n}"]
        run = out / method
        train_unless_done(load_config("moses", sets), run)
        torch.set_num_threads(args.threads)
        model = md4.load(run)
        corpus = load_corpus(str(data), min_length=n)
        rows = torch.as_tensor(np.concatenate([corpus.valid, corpus.test]).astype(np.int64))
        hidden = hide_cells(rows, model.tokenizer, args.hide, args.seed)
        t0 = time.time()
        r, _ = impute_report(model, rows, hidden, corpus.train, draws=args.draws, seed=args.seed)
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        report["runs"][method] = {"steps": max(m["step"] for m in metrics),
                                  "train_minutes": max(m.get("seconds", 0) for m in metrics) / 60,
                                  "impute_seconds": time.time() - t0, "rows": r["rows"], "hidden": r["hidden"],
                                  **({"ess": r["ess"]} if "ess" in r else {})}
        report["methods"].update(r["methods"])
        print(json.dumps({method: report["runs"][method]}), file=sys.stderr)
    (out / "imputation.json").write_text(json.dumps(report, indent=2) + "\n")
    table = table_md(report)
    (out / "imputation.md").write_text(table + "\n")
    print(table)
    return 0


def pooled(method: dict, names: list[str]) -> dict:
    """Accuracy ± binomial SE over the hidden cells of the columns `names`."""
    cells = sum(method["columns"][k]["cells"] for k in names)
    right = sum(method["columns"][k]["accuracy"] * method["columns"][k]["cells"] for k in names
                if method["columns"][k]["cells"])
    p = right / cells if cells else float("nan")
    return {"accuracy": p, "se": (p * (1 - p) / cells) ** 0.5 if cells else float("nan"), "cells": cells}


def table_md(report: dict) -> str:
    """Overall, by kind of column and by the columns' half of the row (AR sees only the cells
    before a column), one row per method; then the runs."""
    def cell(s):
        return f"{s['accuracy']:.3f} ± {s['se']:.3f}" if s["cells"] else "-"

    any_method = next(iter(report["methods"].values()))
    names = list(any_method["columns"])
    half = len(names) // 2
    parts = {**{k: (lambda m, k=k: m["kinds"][k]) for k, s in any_method["kinds"].items() if s["cells"]},
             f"columns 1-{half}": lambda m: pooled(m, names[:half]),
             f"columns {half + 1}-{len(names)}": lambda m: pooled(m, names[half:])}
    lines = [f"| method | all cells ({any_method['overall']['cells']}) | "
             + " | ".join(f"{k} ({get(any_method)['cells']})" for k, get in parts.items()) + " |",
             "|---|---:|" + "---:|" * len(parts)]
    for name, m in report["methods"].items():
        lines.append(f"| {name} | {cell(m['overall'])} | " + " | ".join(cell(get(m)) for get in parts.values()) + " |")
    runs = "; ".join(f"{k}: {r['steps']} steps in {r['train_minutes']:.1f} min, imputation {r['impute_seconds']:.0f} s"
                     + (f", effective sample size {r['ess']:.2f} of {report['draws']}" if "ess" in r else "")
                     for k, r in report["runs"].items())
    return "\n".join(lines) + f"\n\n{runs}"


if __name__ == "__main__":
    sys.exit(main())
