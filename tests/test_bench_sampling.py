"""The sampling benchmark runs end to end on an untrained tiny network (--tiny, a few seconds)."""

import re
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "sampling_speed.py"


def test_tiny_sampling_benchmark_prints_the_table(bench_script):
    code, out, err = bench_script(SCRIPT, "--tiny", "--threads", "1")
    assert code == 0, err
    rows = [line.split("|")[1:-1] for line in out.splitlines() if re.match(r"\| (cosine|uniform) \|", line)]
    assert len(rows) == 2 * 2 * 3  # grids x T x samplers
    for grid, T, sampler, calls, evals, *_, same, entropy, other in (map(str.strip, r) for r in rows):
        assert int(calls) <= int(T) and float(evals) <= int(T) and 0 < float(entropy) <= 4.76 and float(other) >= 0
        if sampler == "cached":
            assert same == "yes" and float(evals) <= 32 + 2  # a first call, one per change, an argmax fill
        if sampler == "jump":
            assert int(calls) <= 32 + 1
