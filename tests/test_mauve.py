"""MAUVE (md4.mauve) on cases with exact answers: P = Q, disjoint supports, and a two-bin
divergence curve against its closed form integrated numerically."""

import math

import numpy as np
import pytest
import torch

from md4.judge import Judge
from md4.mauve import SCALE, divergence_curve, histograms, kmeans, mauve, mauve_of_histograms, pca

DISJOINT = SCALE * math.gamma(SCALE + 1) * math.gamma(SCALE) / math.gamma(2 * SCALE + 1)  # c B(c+1, c) = 1/252


def blobs(centres, n, seed, spread=0.05, dim=8):
    """n points around each of the given unit vectors e_c in R^dim: [n len(centres), dim]."""
    rng = np.random.default_rng(seed)
    eye = np.eye(dim)
    return np.concatenate([eye[c] + spread * rng.standard_normal((n, dim)) for c in centres])


def test_identical_feature_sets_give_one():
    x = np.random.default_rng(0).standard_normal((60, 16))
    r = mauve(x, x.copy(), boot=3)
    assert r["mauve"] == pytest.approx(1.0, abs=1e-6)
    assert r["clusters"] == 6


def test_disjoint_clusters_give_the_disjoint_curve():
    """Samples around e0, e1 and references around e2, e3: no cluster holds both, so p and q have
    disjoint supports and the curve is x = (1 - l)^c, y = l^c, of area c B(c + 1, c) = 1/252."""
    p, q = histograms(blobs([0, 1], 20, 0), blobs([2, 3], 20, 1))
    assert ((p > 0) & (q > 0)).sum() == 0
    assert DISJOINT == pytest.approx(1 / 252)
    assert mauve_of_histograms(p, q, points=4000) == pytest.approx(DISJOINT, abs=1e-6)
    r = mauve(blobs([0, 1], 20, 0), blobs([2, 3], 20, 1), boot=0)
    assert r["mauve"] < 0.01 and math.isnan(r["mauve_se"])


def closed_form_area(p, q, c=SCALE, n=200_001):
    """Area under the curve from its parametric form: x(l) = exp(-c KL(q || r_l)) falls from 1 to
    x(1) as l goes 0 -> 1, y(l) = exp(-c KL(p || r_l)) rises to 1, then y = 1 back to x = 0:
    area = x(1) + int_0^1 y(l) (-dx/dl) dl, -dx/dl = c x(l) sum_i q_i (q_i - p_i) / r_i."""
    lam = np.linspace(0, 1, n)[:, None]
    r = lam * p + (1 - lam) * q
    x = np.exp(-c * (q * np.log(q / r)).sum(1))
    y = np.exp(-c * (p * np.log(p / r)).sum(1))
    f = y * c * x * (q * (q - p) / r).sum(1)
    h = 1 / (n - 1)
    return x[-1] + h * (f.sum() - (f[0] + f[-1]) / 2)


def test_two_bin_curve_matches_its_closed_form():
    p, q = np.array([0.5, 0.5]), np.array([0.25, 0.75])
    curve = divergence_curve(p, q, points=1)  # the single mixture l = 1/2, r = (3/8, 5/8)
    kl_q = 0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625)
    kl_p = 0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625)
    assert curve.ravel().tolist() == pytest.approx([1, 0, math.exp(-5 * kl_q), math.exp(-5 * kl_p), 0, 1])
    exact = closed_form_area(p, q)
    assert 0.5 < exact < 1
    assert mauve_of_histograms(p, q, points=2000) == pytest.approx(exact, abs=1e-6)
    assert mauve_of_histograms(p, q) == pytest.approx(exact, abs=1e-3)  # the default 101 mixtures
    assert mauve_of_histograms(q, q) == pytest.approx(1.0)


def test_pca_keeps_ninety_percent_and_kmeans_is_seeded():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 3)) * np.array([10.0, 2.0, 0.1])  # variances about 100, 4, 0.01
    assert pca(x).shape == (50, 1)
    assert pca(x, 0.99).shape == (50, 2) and pca(x, 1.0).shape == (50, 3)
    pts = blobs([0, 1, 2], 10, 3)
    labels = kmeans(pts, 3, seed=7)
    assert (kmeans(pts, 3, seed=7) == labels).all()
    assert sorted(len(set(labels[i:i + 10])) for i in (0, 10, 20)) == [1, 1, 1]
    assert len(set(labels)) == 3


def test_same_distribution_scores_high_and_the_bootstrap_is_deterministic():
    p, q = blobs([0, 1, 2, 3], 15, 4, spread=0.1), blobs([0, 1, 2, 3], 15, 5, spread=0.1)
    r = mauve(p, q, boot=10)
    assert r["mauve"] > 0.8 and 0 < r["mauve_se"] < 0.2
    assert mauve(p, q, boot=10) == r
    far = mauve(p, blobs([4, 5, 6, 7], 15, 5, spread=0.1), boot=10)
    assert far["mauve"] < 0.05


class FakeJudge:
    """Stands in for md4.judge.Judge: exactly 1 bit per character, and letter counts as features."""

    name, feature_name = "fake judge", "fake judge, letter counts"

    def nll(self, texts, batch_size=16, progress=False):
        return [(len(t) * math.log(2), len(t)) for t in texts]

    def features(self, texts, batch_size=16, progress=False):
        return torch.tensor([[t.count(c) for c in "abcdefghijklmnopqrstuvwxyz "] for t in texts], dtype=torch.float64)


def genppl_rows(capsys, *argv):
    from md4.cli import main

    assert main(["genppl", *map(str, argv)]) == 0
    out = capsys.readouterr().out
    head = out.splitlines()[0]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("| ")]
    return head, {r[0]: dict(zip(rows[0], r)) for r in rows[1:]}


def test_genppl_reports_mauve_distinct_n_and_standard_errors(trained_run, monkeypatch, capsys):
    monkeypatch.setattr(Judge, "load", classmethod(lambda cls, name, device="cpu": FakeJudge()))
    head, rows = genppl_rows(capsys, trained_run, "--judge", "fake", "--num", "6", "--steps", "4", "--reference")
    assert "fake judge, letter counts" in head and "2 clusters" in head and "6 test chunks" in head
    (data,) = [r for name, r in rows.items() if name.startswith("data (")]
    (model,) = [r for name, r in rows.items() if not name.startswith("data (")]
    for r in (model, data):
        assert r["judge bits/char ± SE"] == "1.000 ± 0.000"
        value, se = map(float, r["MAUVE ± SE"].split(" ± "))
        assert 0 < value <= 1 and se >= 0
        d1, d4 = (float(r[f"distinct-{n} ± SE"].split(" ± ")[0]) for n in (1, 4))
        assert 0 < d1 < d4 <= 1
    _, rows = genppl_rows(capsys, trained_run, "--judge", "fake", "--num", "2", "--steps", "4", "--no-mauve")
    assert [r["MAUVE ± SE"] for r in rows.values()] == ["-"]
