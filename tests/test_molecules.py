"""Molecule metrics (md4.molecules) on hand-made SMILES lists with known answers, the MOSES
reader on a small file, and scaffold templates. Skipped with the reason when RDKit is absent."""

import gzip

import pytest

from md4.data.moses import read_moses
from md4.molecules import expand_template


def test_expand_template():
    assert expand_template("C*N", 2) == ["C_N", "C__N"]
    assert expand_template("c1ccccc1_", 3) == ["c1ccccc1_"]
    assert expand_template("*C*", 2) == ["_C_", "_C__", "__C_", "__C__"]


def test_moses_reader_reads_local_files(tmp_path, monkeypatch):
    folder = tmp_path / "moses"
    folder.mkdir()
    for name, rows in (("train.csv.gz", ["CCO", "c1ccccc1"]), ("test.csv.gz", ["CN"])):
        with gzip.open(folder / name, "wt") as f:
            f.write("SMILES\n" + "".join(r + "\n" for r in rows))
    monkeypatch.setenv("MD4_DATA", str(tmp_path))
    assert read_moses() == {"train": ["CCO", "c1ccccc1"], "test": ["CN"]}


def test_metrics_known_answers():
    pytest.importorskip("rdkit", reason="RDKit is not installed (pip install rdkit)")
    from md4.molecules import canonical, internal_diversity, molecule_metrics, scaffold_kept

    assert canonical("OCC") == canonical("CCO") == "CCO"
    assert canonical("C1CC") is None and canonical("") is None and canonical("xyz") is None
    samples = ["CCO", "OCC", "C1CC", "c1ccccc1", "xyz", "", "CCO"]
    m = molecule_metrics(samples, reference=["OCC"], canonicalize_reference=True)
    assert m["samples"] == 7 and m["valid"] == pytest.approx(4 / 7)
    assert m["unique"] == 0.5 and m["novel"] == 0.5  # {CCO, benzene}; CCO is the reference
    assert m["int_div"] == pytest.approx(1.0)  # ethanol and benzene share no Morgan bit
    assert molecule_metrics(samples, reference=["OCC"])["novel"] == 1.0  # reference taken as given
    assert internal_diversity(["CCO", "OCC"]) == pytest.approx(0.0)  # the same molecule twice
    assert scaffold_kept(["c1ccccc1CC", "CCO", "C1CC"], "c1ccccc1") == 0.5  # of the two valid ones


def test_moses_compare_reports_the_sampling_time_of_reused_samples(tmp_path):
    """bench/moses_compare.py's draw(): a re-run that reuses samples.txt still reports what they cost."""
    import importlib.util
    import time
    from pathlib import Path

    import torch

    spec = importlib.util.spec_from_file_location("moses_compare", Path(__file__).parents[1] / "bench" / "moses_compare.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    class Slow:  # 0.05 s a batch
        def sample(self, k, steps, seed):
            time.sleep(0.05)
            return torch.arange(seed, seed + k)

        def decode(self, x):
            return [f"C{int(i)}" for i in x]

    path = tmp_path / "samples.txt"
    samples, per = bench.draw(Slow(), 4, 1, 2, path)
    assert samples == ["C0", "C1", "C2", "C3"] and per >= 0.05 / 2
    again, per_again = bench.draw(Slow(), 4, 1, 2, path)  # nothing drawn: the time is the first run's
    assert again == samples and per_again == per
