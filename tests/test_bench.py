"""The training-throughput benchmark runs end to end (its --tiny preset, in a few seconds)."""

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "train_throughput.py"


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
