"""Peptide statistics (md4.proteins) with known answers, and the PNG."""

import pytest

from md4.proteins import compare_sequences, composition, length_ks, plot_comparison


def test_composition_and_lengths():
    c = composition(["AAC", "X"])
    assert c["A"] == 0.5 and c["C"] == 0.25 and c["other"] == 0.25 and c["W"] == 0
    assert length_ks([1, 2, 3, 4], [1, 2, 3, 4]) == 0.0
    assert length_ks([1, 1], [5, 5]) == 1.0
    assert length_ks([1, 2, 3, 4], [3, 4, 5, 6]) == 0.5  # at L = 2: F_a = 0.5, F_b = 0
    s = compare_sequences(["AA", "CC"], ["AC", "ACDE"])
    assert s["composition_tv"] == pytest.approx(0.5 * (0.5 - 1 / 3 + 0.5 - 1 / 3 + 1 / 6 + 1 / 6))
    assert s["length_mean_samples"] == 2 and s["length_mean_data"] == 3 and s["length_ks"] == 0.5


def test_plot(tmp_path):
    path = plot_comparison(["MKV", "GGA"], ["MKVL", "AAG"], tmp_path / "p.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
