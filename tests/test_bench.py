"""bench.py runs train_dpo.py and its naive trainer end to end and prints its table (the
figures themselves are not asserted: speed is measured, never tested)."""

import json
import subprocess
import sys

from conftest import ROOT, SHAPE, in_process, run_concurrently
from tools import bench, profile

TINY = ["--max-len", "128", "--max-prompt-len", "48", *SHAPE]


def test_bench_times_real_runs_of_its_rows(tmp_path):
    """Two bench commands side by side, each a row on a set (their times are not checked
    here: speed is measured, never tested): the naive trainer on TinyChat, and
    train_dpo.py --packed bf16 on the synthetic set, written first."""
    runs = {"naive": ("tinychat", []), "packed-bf16": ("synthetic", ["--pairs", "24"])}
    results = run_concurrently([
        [sys.executable, "-m", "tools.bench", "--sets", name, "--rows", row, "--k1", "1",
         "--k2", "2", "--batch-size", "4", *more, "--work-dir", str(tmp_path / row),
         "--json", str(tmp_path / f"{row}.json"), "--extra", *TINY]
        for row, (name, more) in runs.items()], timeout=600)
    for (row, (name, _)), out in zip(runs.items(), results):
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert [line.split(" | ")[:2] for line in out.stdout.splitlines()
                if line.startswith(f"| {name}")] == [[f"| {name}", row]], out.stdout
        readings = json.loads((tmp_path / f"{row}.json").read_text())
        assert [(r["set"], r["row"]) for r in readings] == [(name, row)]
        assert readings[0]["peak_mib"] > 100  # a whole process: torch alone is more
        log = (tmp_path / row / "runs" / f"{name}-{row}" / "log.txt").read_text()
        assert "done: 2 steps" in log  # the longer run (the naive trainer: train_dpo.py's flags)


def note_runs(monkeypatch, step_s=lambda cmd: 1.0, peak_mib=lambda cmd: 100.0):
    """bench.run_once replaced: each run's command noted (the list returned), its wall time
    a start-up of 2 s and step_s(cmd) a step, its peak peak_mib(cmd) + steps."""
    runs = []

    def run_once(cmd, cwd, log_path):
        runs.append(cmd)
        steps = int(cmd[cmd.index("--steps") + 1])
        return 2.0 + steps * step_s(cmd), peak_mib(cmd) + steps
    monkeypatch.setattr(bench, "run_once", run_once)
    return runs


def test_bench_rows_on_both_sets_round_after_round(tmp_path, monkeypatch, capsys):
    """The table and the readings from the runs' wall times (note_runs: 0.2 s a step for
    the naive trainer and 0.1 s for --packed bf16): each row's command on each set, rounds
    interleaved, the ratios to the naive row (peak MiB 100 + steps for the naive trainer,
    50 + steps for --packed bf16)."""
    runs = note_runs(monkeypatch, step_s=lambda cmd: 0.2 if "naive" in cmd else 0.1,
                     peak_mib=lambda cmd: 100.0 if "naive" in cmd else 50.0)
    bench.main(["--sets", "tinychat", "synthetic", "--rows", "naive", "packed-bf16",
                "--k1", "1", "--k2", "3", "--batch-size", "4", "--pairs", "24",
                "--repeat", "2", "--work-dir", str(tmp_path), "--json", str(tmp_path / "r.json")])
    printed = capsys.readouterr().out
    row_of = {"naive": "naive", "--packed": "packed-bf16"}
    order = [(("--tokenizer" in cmd and "synthetic") or "tinychat",
              next(row for flag, row in row_of.items() if flag in cmd),
              cmd[cmd.index("--steps") + 1]) for cmd in runs]
    assert order == [(name, row, k) for name in ("tinychat", "synthetic") for _ in (1, 2)
                     for row in ("naive", "packed-bf16") for k in ("1", "3")]
    packed = [cmd for cmd in runs if "--packed" in cmd]
    assert all(cmd[1] == "train_dpo.py" and "bfloat16" in cmd for cmd in packed)
    assert all(cmd[1:4] == ["-m", "tools.bench", "naive"] for cmd in runs if "naive" in cmd)
    # (3 - 1) steps x 4 pairs over (3 - 1) x 0.2 s: 20 pairs/s; --packed bf16 40, 2.00 x naive
    assert "| tinychat | packed-bf16 | 40.00 | 40.00, 40.00 | 53 | 2.00 | 51% |" in printed
    assert "| synthetic | naive | 20.00 | 20.00, 20.00 | 103 | 1.00 | 100% |" in printed
    assert "round 2:" in printed
    readings = json.loads((tmp_path / "r.json").read_text())
    assert len(readings) == 8 and {round(r["pairs_per_s"], 6) for r in readings} == {20, 40}


def test_synthetic_pairs_are_english_words_in_minimind_tokens(tmp_path):
    pairs_path, tok_path = bench.write_synthetic(str(tmp_path), 30)
    assert bench.write_synthetic(str(tmp_path), 30) == (pairs_path, tok_path)  # reused
    with open(pairs_path) as f:
        pairs = [json.loads(line) for line in f]
    assert len(pairs) == 30
    for pair in pairs:
        assert 30 <= len(pair["prompt"][0]["content"].split()) <= 50
        assert 60 <= len(pair["chosen"][0]["content"].split()) <= 120
    import tokenizer
    assert tokenizer.load_tokenizer(tok_path).n_vocab == 6400


FAKE_MINIMIND = '''import argparse, json, os, sys
p = argparse.ArgumentParser()
for name in ["--hidden_size", "--num_hidden_layers", "--max_seq_len", "--batch_size", "--beta",
             "--from_weight", "--data_path", "--save_dir", "--save_weight"]:
    p.add_argument(name)
args = p.parse_args()
with open(args.data_path) as f:
    pairs = [json.loads(line) for line in f]
roles = [[m["role"] for m in pair["chosen"]] for pair in pairs]
with open(os.path.join(os.path.dirname(__file__), "calls.jsonl"), "a") as f:
    f.write(json.dumps({"cwd": os.getcwd(), "args": vars(args), "pairs": len(pairs),
                        "roles": roles[0], "rejected": [m["role"] for m in pairs[0]["rejected"]]})
            + "\\n")
'''


def test_minimind_row_runs_minimind_trainer_on_the_synthetic_pairs(tmp_path):
    checkout = tmp_path / "minimind"
    (checkout / "trainer").mkdir(parents=True)
    (checkout / "trainer" / "train_dpo.py").write_text(FAKE_MINIMIND)
    python = tmp_path / "python"  # --minimind-python: MiniMind's own environment
    python.write_text(f"#!/bin/sh\necho run >> {tmp_path / 'ran'}\nexec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    cmd = [sys.executable, "-m", "tools.bench", "--sets", "tinychat", "synthetic",
           "--rows", "minimind", "--k1", "1", "--k2", "3", "--batch-size", "4", "--pairs", "24",
           "--work-dir", str(tmp_path / "work"), "--minimind", str(checkout),
           "--minimind-python", str(python)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "| synthetic | minimind |" in out.stdout and "| tinychat |" not in out.stdout
    calls = [json.loads(line) for line in (checkout / "trainer" / "calls.jsonl").open()]
    assert [c["pairs"] for c in calls] == [4, 12]  # k x batch: one epoch is k steps
    assert (tmp_path / "ran").read_text() == "run\nrun\n"  # both runs in that Python
    for call in calls:
        assert call["cwd"] == str(checkout / "trainer")  # MiniMind's paths are relative to it
        assert (call["roles"], call["rejected"]) == (["user", "assistant"], ["user", "assistant"])
        assert {k: call["args"][k] for k in ("hidden_size", "num_hidden_layers", "max_seq_len",
                                             "batch_size", "from_weight")} == {
            "hidden_size": "256", "num_hidden_layers": "4", "max_seq_len": "256",
            "batch_size": "4", "from_weight": "none"}


def test_a_compiled_row_warms_the_cache_before_its_timed_runs(tmp_path, monkeypatch):
    """--extra --compile: an untimed k1-step run first, then the two timed ones (a cold
    compile in the first timed run alone made the difference negative: -16 pairs/s)."""
    runs = note_runs(monkeypatch)  # a wall time that grows with the steps
    common = ["--sets", "tinychat", "--rows", "default", "--k1", "1", "--k2", "3",
              "--batch-size", "4", "--work-dir", str(tmp_path)]
    bench.main([*common, "--extra", "--compile"])
    assert [cmd[cmd.index("--steps") + 1] for cmd in runs] == ["1", "1", "3"]
    runs.clear()
    bench.main(common)
    assert [cmd[cmd.index("--steps") + 1] for cmd in runs] == ["1", "3"]


def test_minimind_row_needs_a_checkout():
    out = subprocess.run([sys.executable, "-m", "tools.bench", "--rows", "minimind"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2 and "--minimind DIR" in out.stderr


def test_profile_accounts_for_the_step_through_the_script(tmp_path):
    """`python -m tools.profile`: train_dpo.py itself under the profiler, each kind of
    work's share of the recorded steps, which add up to the whole step; the matmuls'
    FLOPs and the bound from the machine's own rate at those shapes."""
    result = tmp_path / "profile.json"
    cmd = [sys.executable, "-m", "tools.profile", "--sets", "tinychat", "--rows", "packed-bf16",
           "--warmup", "2", "--steps", "3", "--batch-size", "4", "--work-dir", str(tmp_path),
           "--json", str(result), "--extra", *TINY]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert [line.split(" | ")[:2] for line in out.stdout.splitlines()
            if line.startswith("| tinychat")] == [["| tinychat", "packed-bf16"]]
    row = json.loads(result.read_text())["rows"][0]
    shares = {kind: s / row["wall"] for kind, s in row["seconds"].items()}
    assert 0.9 < sum(shares.values()) < 1.05, shares  # every op's own time, once
    assert shares["matmul"] > 0 and shares["attention"] > 0 and shares["casts"] > 0
    assert shares["optimizer"] > 0 and shares["data"] > 0
    dtypes = {json.loads(d)[0] for name, s, d, *_ in row["matmuls"] if name == "aten::mm"}
    assert "c10::BFloat16" in dtypes and "float" in dtypes  # the projections, the fp32 head
    assert 0 < row["bound_seconds"] < row["wall"]


def test_profile_script_sft_times_train_sft_py(tmp_path):
    """`--script sft`: train_sft.py itself under the profiler (TinyChat's SFT data), its
    rows per conversation; no collective in one process. The tool's main in this process
    (conftest.in_process; the test above runs it as a process), its runs processes."""
    out = in_process(profile.main, "--sets", "tinychat", "--script", "sft", "--rows",
                     "default", "--warmup", "1", "--steps", "2", "--batch-size", "4",
                     "--work-dir", tmp_path, "--json", tmp_path / "p.json", "--extra", *SHAPE)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "bound conversations/s" in out.stdout and "sft, 1 process(es)" in out.stdout
    row = json.loads((tmp_path / "p.json").read_text())["rows"][0]
    assert row["seconds"]["matmul"] > 0 and row["seconds"]["data"] > 0
    assert row["seconds"]["all-reduce"] == 0 and row["steps"] == 2
