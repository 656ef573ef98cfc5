"""Peptides (issue 18): train MD4 on the sequences of a FASTA file (one record each, amino-acid
characters), sample, and compare the samples' composition and length distribution with the test
sequences (and, as the floor, the training sequences' distance from the test ones by the same
measures): OUT/peptides.json and OUT/peptides.png.

    flock /work/cpu.lock python bench/peptide_stats.py PEPTIDES.fasta --out runs/peptides --minutes 10 --max-length 128
    python bench/peptide_stats.py --tiny --out /tmp/peptides-tiny     # made-up peptides, a minute

(PyPI `pepdata` downloads its IEDB peptides at run time, so it ships no sequences offline; use
any FASTA file.) Resumable: the prepared folder and a finished run are reused.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

import md4
from md4.config import load_config
from md4.data import load_corpus
from md4.data.records import is_records, prepare_records
from md4.proteins import AMINO_ACIDS, compare_sequences, plot_comparison
from md4.train import train

TINY = ["model.dim=32", "model.layers=2", "model.heads=2", "model.cond_dim=16", "train.steps=40",
        "train.batch_size=16", "train.eval_every=40", "train.ckpt_every=40", "train.warmup=5"]


def made_up_fasta(path: Path, n: int = 400, seed: int = 0) -> Path:
    """Peptides of 8-15 residues with a skewed composition (a smoke test's data)."""
    rng = random.Random(seed)
    weights = [1 + 4 * (a in "LAGS") for a in AMINO_ACIDS]
    path.write_text("".join(f">p{i}\n" + "".join(rng.choices(AMINO_ACIDS, weights, k=rng.randint(8, 15))) + "\n"
                            for i in range(n)))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fasta", nargs="?")
    p.add_argument("--out", default="runs/peptides")
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--steps", type=int, default=100, help="sampling steps")
    p.add_argument("--max-length", type=int, default=0, help="drop sequences longer than this (0 = keep all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        args.fasta, args.num, args.steps = args.fasta or made_up_fasta(out / "made_up.fasta"), 64, 16
    if not args.fasta:
        p.error("name a FASTA file (or --tiny)")
    data = out / "data"
    if not is_records(data):
        prepare_records([args.fasta], data, valid=0.05, test=0.05, max_length=args.max_length)
    lengths = np.concatenate([np.load(data / f"{s}_lengths.npy") for s in ("train", "valid", "test")])
    length = int(lengths.max()) + 1  # every record and its end token
    sets = (TINY if args.tiny else []) + [f"data.corpus={data}", f"data.length={length}",
                                          f"train.max_minutes={args.minutes}", f"train.threads={args.threads}"] + args.set
    run = out / "md4"
    if not (run / "model" / "config.json").exists():
        train(load_config("demo", sets), run)
    torch.set_num_threads(args.threads)
    model = md4.load(run)
    samples = model.decode(torch.cat([model.sample(min(250, args.num - k), steps=args.steps, seed=k)
                                      for k in range(0, args.num, 250)]))
    corpus = load_corpus(str(data), min_length=model.length)
    test = corpus.records("test")
    stats = compare_sequences(samples, test)
    # the floor: how far the training sequences are from the test ones by the same measures
    floor = compare_sequences(corpus.records("train"), test)
    stats["train_vs_test"] = {"composition_tv": floor["composition_tv"], "length_ks": floor["length_ks"],
                              "length_mean_train": floor["length_mean_samples"], "train": floor["samples"]}
    (out / "peptides.json").write_text(json.dumps(stats, indent=2) + "\n")
    plot_comparison(samples, test, out / "peptides.png", title=f"MD4 samples vs {Path(args.fasta).name} (test)")
    print(f"composition TV {stats['composition_tv']:.3f}; length mean {stats['length_mean_samples']:.1f} vs "
          f"{stats['length_mean_data']:.1f}, KS {stats['length_ks']:.3f} (train vs test: TV "
          f"{floor['composition_tv']:.3f}, KS {floor['length_ks']:.3f}); {out / 'peptides.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
