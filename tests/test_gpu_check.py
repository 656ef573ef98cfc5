"""bench/gpu_check.sh on the CPU with tiny sizes: every section runs and lands in one table; an
error in one section is its row and the others still run; a section that hangs is killed at its
limit (its own process) and reported as TIMEOUT."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
SECTIONS = ["device", "numerics", "throughput", "profile", "compile", "data", "tests", "train", "sampling",
            "distributed"]


def run(tmp_path, *args, inject=""):
    env = {**os.environ, "PYTHON": sys.executable, "MD4_GPU_CHECK_INJECT": inject, "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "rows.json"
    proc = subprocess.run(["bash", str(SCRIPT), "--tiny", "--json", str(out), "--work", str(tmp_path / "work"),
                           *args], capture_output=True, text=True, timeout=300, env=env)
    return proc, json.loads(out.read_text()) if out.is_file() else []


def test_tiny_check_runs_every_section_and_reports_an_error_as_a_row(tmp_path):
    """compile is made to fail (it is a SKIP on the CPU otherwise): its row says so, exit status 1,
    and every other section has its rows, PASS / INFO or SKIP."""
    proc, rows = run(tmp_path, inject="compile=error")
    assert proc.returncode == 1, proc.stderr[-2000:]
    by = {}
    for r in rows:
        by.setdefault(r["section"], []).append(r)
    assert list(by) == SECTIONS
    assert [r["status"] for r in by["compile"]] == ["ERROR"]
    assert "injected error in compile" in by["compile"][0]["result"]
    others = [r for r in rows if r["section"] != "compile"]
    assert {r["status"] for r in others} <= {"PASS", "INFO", "SKIP"}, [r for r in others if r["status"] not in
                                                                      ("PASS", "INFO", "SKIP")]
    assert [r["status"] for r in by["numerics"]] == ["PASS", "PASS", "PASS"]  # loss, gradients, cached == ancestral
    assert by["throughput"][0]["status"] == "INFO" and by["throughput"][0]["rows"][0]["tokens_s"] > 0
    shares = by["profile"][0]["shares"]
    assert abs(sum(shares.values()) - 1) < 1e-6 and shares.get("matmul", 0) > 0
    if by["data"][0]["status"] == "PASS":  # the plays and GPT-2 merges are present (../shared/data)
        assert [r["status"] for r in by["train"]] == ["PASS", "INFO", "PASS"]  # the loss fell; eval; samples
        assert [r["status"] for r in by["distributed"]] == ["PASS", "PASS", "PASS"]  # DDP, FSDP, same first loss
    else:
        assert {r["status"] for r in by["train"] + by["distributed"]} == {"SKIP"}
    table = proc.stdout.split("| section | check | status | result | s |", 1)[1]
    assert table.count("\n| ") == len(rows) and "RESULT" in proc.stdout


def test_a_frozen_section_is_killed_after_its_limit(tmp_path):
    """A section deaf to its own alarm (stuck in a GPU call, say) is killed with its process group."""
    proc, rows = run(tmp_path, "--isolate", "--sections", "compile", "--section-limit", "2", "--grace", "1",
                     inject="compile=freeze")
    assert proc.returncode == 1 and [(r["section"], r["status"]) for r in rows] == [("compile", "TIMEOUT")]
    assert rows[0]["result"] == "killed 1 s after its limit of 2 s"


@pytest.mark.parametrize("op,category", [("aten::addmm", "matmul"),
                                         ("aten::_efficient_attention_backward", "attention"),
                                         ("aten::_log_softmax", "softmax / cross-entropy"),
                                         ("aten::native_layer_norm_backward", "layer norm"),
                                         ("aten::_fused_adamw_", "optimizer / EMA"),
                                         ("aten::mul", "elementwise / other")])
def test_profile_categories(op, category):
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_check import category as categorize

    assert categorize(op) == category
