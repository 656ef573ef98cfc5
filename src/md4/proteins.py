"""Protein and peptide sequences as records: amino-acid composition and length distribution of
samples against the data, as numbers and as a PNG.

    stats = compare_sequences(samples, data)       # data: e.g. corpus.records("test")
    plot_comparison(samples, data, "peptides.png")

Composition: the fraction of each of the 20 standard amino acids (ACDEFGHIKLMNPQRSTVWY) among
all residues, anything else counted as "other"; the distance between two compositions is the
total variation 0.5 sum_a |p_a - q_a|. Lengths: mean and standard deviation, and the
Kolmogorov-Smirnov statistic max_L |F_samples(L) - F_data(L)| of the two length distributions.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
LETTERS = list(AMINO_ACIDS) + ["other"]


def composition(sequences: list[str]) -> dict[str, float]:
    """Fraction of each amino acid (and "other") among all residues of the sequences."""
    counts = Counter("".join(sequences))
    total = sum(counts.values()) or 1
    out = {a: counts.get(a, 0) / total for a in AMINO_ACIDS}
    out["other"] = 1 - sum(out.values()) if counts else 0.0
    return out


def length_ks(a: list[int], b: list[int]) -> float:
    """max_L |F_a(L) - F_b(L)| for two samples of lengths (0 when either is empty)."""
    if not a or not b:
        return 0.0
    grid = np.union1d(a, b)
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def compare_sequences(samples: list[str], data: list[str]) -> dict:
    """Composition of both, its total variation distance, and length statistics."""
    p, q = composition(samples), composition(data)
    ls, ld = [len(s) for s in samples], [len(s) for s in data]
    return {"samples": len(samples), "data": len(data),
            "composition_samples": p, "composition_data": q,
            "composition_tv": 0.5 * sum(abs(p[a] - q[a]) for a in LETTERS),
            "length_mean_samples": float(np.mean(ls)) if ls else float("nan"),
            "length_mean_data": float(np.mean(ld)) if ld else float("nan"),
            "length_std_samples": float(np.std(ls)) if ls else float("nan"),
            "length_std_data": float(np.std(ld)) if ld else float("nan"),
            "length_ks": length_ks(ls, ld)}


def plot_comparison(samples: list[str], data: list[str], path: str | Path, title: str = "") -> Path:
    """A PNG: composition bars (data vs samples) and the two length histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = compare_sequences(samples, data)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    x = np.arange(len(LETTERS))
    ax1.bar(x - 0.2, [s["composition_data"][a] for a in LETTERS], 0.4, label=f"data ({len(data)})")
    ax1.bar(x + 0.2, [s["composition_samples"][a] for a in LETTERS], 0.4, label=f"samples ({len(samples)})")
    ax1.set_xticks(x, LETTERS, fontsize=8)
    ax1.set_ylabel("fraction of residues")
    ax1.set_title(f"composition (total variation {s['composition_tv']:.3f})")
    ax1.legend()
    top = max([len(q) for q in samples + data] + [1])
    bins = np.arange(0, top + 2) - 0.5
    ax2.hist([len(q) for q in data], bins=bins, density=True, alpha=0.6, label="data")
    ax2.hist([len(q) for q in samples], bins=bins, density=True, alpha=0.6, label="samples")
    ax2.set_xlabel("length (residues)")
    ax2.set_title(f"lengths (KS {s['length_ks']:.3f})")
    ax2.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
