"""bench/sampler_frontier.py end to end in --tiny mode on the session's tiny run, with a fake judge
(md4.judge is not needed): every available setting at budgets 4 and 8, the reference, the data
row, the table, the PNG, and a rerun that reuses the saved rows."""

import json
import sys
from pathlib import Path

import pytest
from test_mauve import FakeJudge

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import sampler_frontier  # noqa: E402

import md4  # noqa: E402


def test_tiny_frontier_counts_calls_and_scores_every_setting(trained_run, tmp_path, capsys, one_thread):
    out = tmp_path / "frontier"
    assert sampler_frontier.main([str(trained_run), "--tiny", "--out", str(out)], judge=FakeJudge()) == 0
    rows = json.loads((out / "frontier.json").read_text())["rows"]
    by = {(r["setting"], r["steps"]): r for r in rows}
    err = capsys.readouterr().err
    method = md4.load(trained_run).method
    for s in sampler_frontier.SETTINGS:
        why = sampler_frontier.unavailable(s, method, True)
        ran = any(name == s.name for name, _ in by)
        assert ran == (why is None), (s.name, why)
        if why:
            assert f"skipped {s.name}: {why}" in err
    ref = by[("ancestral", 1024)]
    assert ref["reference"] and ref["sampler"] == "cached" and ref["calls_per_sample"] <= 32 + 1
    for T in (4, 8):
        assert by[("ancestral", T)]["calls"] == T and by[("ancestral", T)]["calls_per_sample"] == T
        assert by[("cached", T)]["calls_per_sample"] <= T and by[("jump", T)]["calls_per_sample"] <= T
    for r in rows:
        assert r["judge_bits_per_char"] == pytest.approx(1.0)  # the fake judge: 1 bit per character
        assert 0 < r["mauve"] <= 1 and 0 < r["distinct_1"] < r["distinct_4"] <= 1
    assert by[("data", "-")]["mauve"] > 0.5  # real text against other real text
    table = (out / "frontier.md").read_text()
    assert "fake judge, letter counts" in table and "(reference)" in table
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == len(rows) + 1
    assert (out / "frontier.png").stat().st_size > 10_000
    # a rerun draws nothing new: every row is found in frontier.json
    assert sampler_frontier.main([str(trained_run), "--tiny", "--out", str(out)], judge=FakeJudge()) == 0
    assert "calls/sample" not in capsys.readouterr().err
    # a sitting with other settings adds its rows and the table still shows the earlier ones
    assert sampler_frontier.main([str(trained_run), "--tiny", "--out", str(out), "--settings", "jump"],
                                 judge=FakeJudge()) == 0
    assert (out / "frontier.md").read_text() == table
