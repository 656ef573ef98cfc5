"""The training-throughput benchmark runs end to end (its --tiny preset, in a few seconds)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "train_throughput.py"
GPU_SCRIPT = SCRIPT.with_name("gpu_throughput.py")


def test_tiny_benchmark_prints_throughput():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    rates = re.findall(r"^(fp32|bf16): ([\d,]+) tokens/s", proc.stdout, flags=re.M)
    assert [dtype for dtype, _ in rates] == ["fp32", "bf16"]
    assert all(float(rate.replace(",", "")) > 0 for _, rate in rates)
    assert proc.stdout.count("\n| ") >= 3  # markdown table: header and one row per dtype


def test_unknown_dtype_is_a_usage_error():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--dtypes", "fp16"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "fp16" in proc.stderr


def test_tiny_gpu_throughput_benchmark_runs_on_cpu():
    """bench/gpu_throughput.py --tiny: training tokens/s and MFU at each micro-batch, and sampling speed."""
    import json

    proc = subprocess.run([sys.executable, str(GPU_SCRIPT), "--tiny", "--device", "cpu", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert [row["batch"] for row in r["train"]] == [2, 4] and r["largest_batch"] == 4
    for row in r["train"]:
        assert row["tokens_s"] > 0 and 0 < row["mfu"] < 1
        assert row["tokens_s"] == pytest.approx(row["batch"] * 64 / (row["step_ms"] / 1e3))
    assert r["sample"]["tokens_s"] > 0 and r["sample"]["steps"] == 4
    assert "| micro-batch | tokens/s |" in proc.stdout
