"""The tools run by hand, run the way a person runs them, on a small scale."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import ROOT, in_process
from tools import headline


def test_the_mutation_check_kills_a_planted_sign_flip(tmp_path):
    """`python -m tools.mutants --tree T --only NAME` copies T, plants the bug, runs its
    tests and says what killed it."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", "out", "__pycache__",
                                                              ".pytest_cache"))
    result = subprocess.run([sys.executable, "-m", "tools.mutants", "--tree", str(tree),
                             "--only", "sigmoid-sign"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    row = [line for line in result.stdout.splitlines() if line.startswith("| sigmoid-sign")]
    assert len(row) == 1 and "| killed | tests/test_loss.py::" in row[0], result.stdout
    assert "1 of 1 mutants killed" in result.stdout
    with open(os.path.join(tree, "loss.py"), encoding="utf-8") as f:  # the copy's copy only
        assert "losses = -F.logsigmoid(beta * h)  # Eq. 7" in f.read()


def test_the_headline_is_one_command_over_seeds(tmp_path, monkeypatch):
    """`python -m tools.headline --seeds 2`: the card's command per seed in a folder of its
    own (SFT first, then DPO), evaluate.py on the test split, the table with every seed's
    value and the mean's 95% interval; run again, nothing is trained again."""
    out = tmp_path / "headline"
    small = "--steps 2 --batch-size 4 --val-data '' --samples 0"
    cmd = [sys.executable, "-m", "tools.headline", "--seeds", "2", "--nproc", "1",
           "--out-dir", str(out), "--samples", "1", "--limit", "6",
           "--train-flags", f"{small} --sft-flags \"{small} --eval-every 0\""]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in
            first.stdout.splitlines() if line.startswith("| ")}
    assert rows["test split"] == ["seed 1337", "seed 1338", "mean ± 95% interval |"]
    for name in ("gain (DPO - SFT)", "win rate over SFT", "harmful refused, DPO",
                 "benign refused, DPO", "KL(DPO || SFT), nats per answer"):
        assert "±" in rows[name][-1], name
    for seed in (1337, 1338):
        log = (out / f"seed{seed}" / "train.log").read_text()
        assert "no SFT checkpoint" in log and f"--seed {seed}" in log  # the SFT stage first
        assert (out / f"seed{seed}" / "dpo.pt").exists()
    with open(out / "seed1337" / "eval_test.json", encoding="utf-8") as f:
        assert json.load(f)["args"]["split"] == "test"
    trained = os.path.getmtime(out / "seed1337" / "dpo.pt")
    again = in_process(headline.main, *cmd[3:])  # the script, without its process this time
    assert again.returncode == 0 and "seed 1337: python train_dpo.py" not in again.stdout
    assert "seed 1337: python train_dpo.py --seed 1337" in first.stdout
    assert os.path.getmtime(out / "seed1337" / "dpo.pt") == trained

    # --onpolicy, its --onpolicy-flags passed on to tools/iterate.py. A 2-step model's answers
    # all score 0 under TinyChat's judge (no pair would form), so each seed's round is made
    # here first with a judge that scores by length, from the command the script will run:
    # the script's iterate.py finds it done (the same settings, --warmup-share included).
    # One seed, to keep it short.
    import tasks
    from tools import iterate
    monkeypatch.setattr(tasks, "judge", lambda meta, text: {
        "score": (len(text) % 5) / 4, "correct": 1.0, "polite": 1.0, "concise": 1.0,
        "refused": 0.0})
    onpolicy = ["--rounds", "1", "--prompts", "6", "--k", "3", "--min-gap", "0.25",
                "--max-new-tokens", "12", "--lr", "1e-3", "--warmup-share", "0.5",
                "--train-flags", "--steps 4 --batch-size 1 --val-data '' --quiet"]
    seed = out / "seed1337"
    iterate.main(["--sft-ckpt", str(seed / "sft.pt"), "--out-dir", str(seed / "onpolicy"),
                  "--seed", "1337", "--eval-samples", "0", "--nproc", "1", *onpolicy])
    record = json.loads((seed / "onpolicy" / "round1" / "round.json").read_text())
    assert record["warmup_steps"] == 2  # half of the round's 4 steps
    one_seed = cmd[:]
    one_seed[one_seed.index("--seeds") + 1] = "1"
    third = in_process(headline.main, *one_seed[3:], "--onpolicy", "--onpolicy-flags",
                       shlex.join(onpolicy))
    assert third.returncode == 0, third.stderr[-2000:]
    assert "round 1: done already" in (seed / "onpolicy.log").read_text()
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in
            third.stdout.splitlines() if line.startswith("| ")}
    assert "on-policy judge score" in rows and "on-policy - offline (paired)" in rows


def test_the_gpu_checks_timing_window_on_the_cpu(files, sft_ckpt, tmp_path):
    """tools/gpu_check.py times each row inside its process: the trainer's per-step
    records after the warm-up steps, the process stopped once the window holds
    --seconds. Here on the CPU, for train_dpo.py and the naive trainer (side by side)."""
    from conftest import dpo_args
    from tools import gpu_check
    args = gpu_check.parse_args(["--warmup", "2", "--seconds", "1.5", "--row-limit", "120",
                                 "--batch-size", "4"])

    def row(name, cmd):
        out = tmp_path / name
        out.mkdir()
        flags = dpo_args(files, out, sft_ckpt, "--batch-size", "4", "--steps", "100000",
                         "--log-every", "1", "--no-save", "--val-data", "", "--samples", "0")
        t0 = time.time()
        (steps, seconds), peak = gpu_check.time_row([sys.executable, *cmd, *flags], str(out),
                                                    args)
        assert time.time() - t0 < 100  # stopped long before its 100,000 steps
        assert steps >= 1 and 1.5 <= seconds < 10 and peak is None  # no GPU: no peak
        records = gpu_check.read_records(out / "dpo" / "metrics.jsonl")
        assert records[-1]["step"] == steps + 2  # every step after the warm-up is timed
        assert "Traceback" not in (out / "log.txt").read_text()
    with ThreadPoolExecutor(2) as pool:
        done = [pool.submit(row, "dpo", ["train_dpo.py"]),
                pool.submit(row, "naive", ["-m", "tools.bench", "naive"])]
        for future in done:
            future.result()  # its assertion, if one failed


def test_the_gpu_checks_window_is_the_difference_of_elapsed_times():
    from tools import gpu_check
    records = [{"step": s, "pairs_per_s": s * 8 / (1.0 + 0.5 * s)} for s in range(1, 21)]
    steps, seconds = gpu_check.window(records, 10, 8)  # elapsed(s) = 1 + 0.5 s
    assert steps == 10 and abs(seconds - 5.0) < 1e-9
    assert gpu_check.window(records[:10], 10, 8) == (0, 0.0)  # nothing after the warm-up
