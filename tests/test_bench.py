"""bench.py runs end to end and prints its table (figures themselves are not asserted)."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_bench_prints_a_row_per_mode():
    cmd = [sys.executable, os.path.join(ROOT, "bench.py"), "--modes", "naive", "precompute",
           "sft", "--steps", "1", "--warmup", "1", "--pairs", "16", "--batch-size", "4",
           "--dim", "32", "--n-layers", "1", "--n-heads", "4", "--n-kv-heads", "2",
           "--ffn-dim", "64", "--vocab-size", "300", "--prompt-len", "10",
           "--response-len", "20", "--max-len", "48", "--peak-shapes", "small", "--threads", "1",
           "--preset", "tiny"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    for mode in ("naive", "precompute", "sft"):
        assert any(line.startswith(mode + " ") for line in lines), out.stdout
    assert "matmul peak" in out.stdout and "MFU" in out.stdout


def test_one_bench_row_runs_on_its_own(tmp_path):
    # what bench.py runs in a fresh process for each row: --run-mode writes --result
    result = str(tmp_path / "row.json")
    cmd = [sys.executable, os.path.join(ROOT, "bench.py"), "--run-mode", "chunked", "--result",
           result, "--steps", "1", "--warmup", "0", "--pairs", "8", "--batch-size", "4",
           "--dim", "32", "--n-layers", "1", "--n-heads", "4", "--n-kv-heads", "2",
           "--vocab-size", "300", "--prompt-len", "10", "--response-len", "20", "--max-len", "48"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    with open(result) as f:
        row = json.load(f)
    assert row["mode"] == "chunked" and row["pairs_per_s"] > 0
