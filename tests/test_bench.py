"""The throughput benchmarks run end to end (their --tiny presets, in a few seconds), on any CPU."""

import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "train_throughput.py"
GPU_SCRIPT = SCRIPT.with_name("gpu_throughput.py")


def test_tiny_benchmark_prints_throughput(bench_script):
    """The script in this process; it times each dtype in a process of its own."""
    code, out, err = bench_script(SCRIPT, "--tiny", "--threads", "1")
    assert code == 0, err
    rates = re.findall(r"^(fp32|bf16): ([\d,]+) tokens/s", out, flags=re.M)
    assert [dtype for dtype, _ in rates] == ["fp32", "bf16"]
    assert all(float(rate.replace(",", "")) > 0 for _, rate in rates)
    assert out.count("\n| ") >= 3  # markdown table: header and one row per dtype


def test_unknown_dtype_is_a_usage_error(bench_script):
    code, _, err = bench_script(SCRIPT, "--tiny", "--dtypes", "fp16")
    assert code == 2 and "fp16" in err


def test_tiny_gpu_throughput_benchmark_runs_on_cpu(bench_script):
    """bench/gpu_throughput.py --tiny: training tokens/s and MFU at each micro-batch, and sampling speed.
    MFU is measured against the matmul rate in the dtype md4 trains in on this CPU (bf16 only where
    it is native): a positive finite number, named with its dtype; no speed is compared with another."""
    import json

    from md4.train import use_bf16

    code, out, err = bench_script(GPU_SCRIPT, "--tiny", "--device", "cpu", "--threads", "1")
    assert code == 0, err
    r = json.loads(out.split("RESULT ", 1)[1])
    dtype = "bf16" if use_bf16("auto", torch.device("cpu")) else "fp32"
    assert r["dtype"] == dtype and r["matmul_tflops"] > 0
    assert [row["batch"] for row in r["train"]] == [2, 4] and r["largest_batch"] == 4
    for row in r["train"]:
        assert row["tokens_s"] > 0 and 0 < row["mfu"] < math.inf
        assert row["tokens_s"] == pytest.approx(row["batch"] * 64 / (row["step_ms"] / 1e3))
    assert r["sample"]["tokens_s"] > 0 and r["sample"]["steps"] == 4
    assert f"| micro-batch | dtype | tokens/s | step ms | MFU of the {dtype} matmul rate |" in out
    assert f"| 4 | {dtype} | " in out and f"attained {dtype} matmul" in out


def test_gpu_throughput_auto_dtype_is_fp32_where_bf16_is_not_native(monkeypatch):
    """--dtype auto follows md4.train.use_bf16: on a CPU without native bf16 (simulated) the benchmark
    runs and rates fp32, whose matmul is not emulated; explicit choices are kept."""
    spec = importlib.util.spec_from_file_location("gpu_throughput", GPU_SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    import md4.train

    monkeypatch.setattr(md4.train, "native_bf16_cpu", lambda: False)
    assert bench.pick_dtype("auto", cpu) == "fp32" and bench.pick_dtype("auto", gpu) == "bf16"
    monkeypatch.setattr(md4.train, "native_bf16_cpu", lambda: True)
    assert bench.pick_dtype("auto", cpu) == "bf16"
    assert bench.pick_dtype("fp32", gpu) == "fp32" and bench.pick_dtype("bf16", cpu) == "bf16"


def test_native_bf16_follows_the_cpu_flags(monkeypatch):
    """An AVX-512 CPU without the bf16 instructions (oneDNN would still say yes) runs fp32; a CPU with
    AVX512-BF16 or AMX-BF16 runs bf16; an AVX2-only EPYC runs fp32."""
    from md4.train import native_bf16_cpu

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert not native_bf16_cpu("flags : fpu sse avx2 avx512f avx512bw avx512vl avx512dq")
    assert native_bf16_cpu("flags : fpu avx2 avx512f avx512_bf16")
    assert native_bf16_cpu("flags : fpu avx2 amx_tile amx_bf16")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert not native_bf16_cpu("flags : fpu avx2 fma")
