"""Shared pytest fixtures and helpers: the shipped tokenizer, data files, small TinyChat
slices, an SFT checkpoint, and running the training scripts (also under torchrun)."""

import contextlib
import io
import json
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import tokenizer
import train_sft
from checkpoint import load_checkpoint
from errors import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def enc():
    return tokenizer.load_tokenizer()


@pytest.fixture
def write_file(tmp_path):
    """write_file(name, records_or_text) -> path; records are written one JSON per line."""

    def write(name, content):
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        elif name.endswith(".json"):
            path.write_text(json.dumps(content), encoding="utf-8")
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in content), encoding="utf-8")
        return str(path)

    return write


SHAPE = ["--dim", "32", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2",
         "--max-seq-len", "256"]
QUIET = ["--quiet", "--samples", "0", "--seed", "3"]
# these tests check CPU numbers (bit-equal resume, ...): on a GPU box too (tests/gpu/ has
# the GPU's own), and in float32 (--dtype auto takes bfloat16 on a CPU with bf16
# instructions; the tests of bf16 ask for it)
CPU = ["--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """Small slices of the shipped TinyChat files."""
    d = tmp_path_factory.mktemp("data")
    paths = {}
    for name, n in [("sft_train", 256), ("sft_val", 32), ("pairs_train", 128),
                    ("pairs_val", 32)]:
        with open(os.path.join(ROOT, "data", f"{name}.jsonl"), encoding="utf-8") as f:
            lines = [next(f) for _ in range(n)]
        paths[name] = str(d / f"{name}.jsonl")
        with open(paths[name], "w", encoding="utf-8") as f:
            f.writelines(lines)
    return paths


def command(script):
    """How a user runs a script: `python train_dpo.py`, or `python -m tools.sweep` for
    tools/sweep.py (from the repository root)."""
    if script.startswith("tools/"):
        return [sys.executable, "-m", "tools." + os.path.basename(script)[:-3]]
    return [sys.executable, os.path.join(ROOT, script)]


def sft_args(files, out, *extra):
    return ["--data", files["sft_train"], "--val-data", files["sft_val"], "--out-dir", str(out),
            "--lr", "3e-3", "--warmup-steps", "2", *SHAPE, *QUIET, *CPU, *extra]


def dpo_args(files, out, sft_ckpt, *extra):
    return ["--data", files["pairs_train"], "--val-data", files["pairs_val"],
            "--out-dir", str(out), "--sft-ckpt", str(sft_ckpt), "--lr", "1e-3",
            "--warmup-steps", "2", *QUIET, *CPU, *extra]


def run_concurrently(commands, timeout=300):
    """Independent script runs, two at a time (most of a short run is Python's start-up, on
    one core of this machine's two); their CompletedProcess results, in order."""
    def one(cmd):
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(one, commands))


def in_process(main, *args):
    """A script's main(argv) as `python script.py ARGS` runs it (errors.run_main: a user's
    mistake is one line on stderr and exit status 1, argparse's status 2), but in this
    process: its flags through its own parser, without the interpreter's start (1.5-3 s,
    most of a short run). Each script also runs as a process of its own, in the tests of
    its one-line errors (test_errors.py) or of the tool that calls it. A CompletedProcess."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_main(main, [str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = 0 if e.code is None else e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def torchrun(script, args, timeout=300):
    """Run a script under torchrun with 2 processes; fail (never hang) past timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, script), *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def tiny_pairs(B=3, seed=0):
    """B made-up pairs of token ids (vocabulary 50), as data.pair_batch takes them."""
    g = random.Random(seed)
    ints = lambda n: [g.randrange(3, 50) for _ in range(n)]  # noqa: E731
    items = []
    for b in range(B):
        chosen, rejected = ints(3 + b), ints(5 - b)
        items.append({"prompt": ints(4 + b), "chosen": chosen, "chosen_mask": [1] * len(chosen),
                      "rejected": rejected, "rejected_mask": [1] * len(rejected)})

    class Pairs(list):
        pad_id = 0
    return Pairs(items)


def weights(path):
    return load_checkpoint(path)["model"]


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="session")
def sft_ckpt(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    train_sft.main(sft_args(files, out, "--steps", "12", "--batch-size", "16"))
    return out / "sft.pt"


# The quick tier, `pytest -m "not slow"` (under 30 s): the maths, the data, the model and
# the tokenizer, for someone changing the core. A test is slow when it trains (it takes
# the data slices or a trained checkpoint) or runs the scripts end to end.
SLOW_FIXTURES = {"files", "sft_ckpt", "checkpoints", "stand_in_judge"}
SLOW_MODULES = {"test_bench", "test_errors", "test_evaluate", "test_iterate", "test_minimind",
                "test_plot", "test_reliability", "test_tools", "test_wandb"}
SLOW_TESTS = {"test_sample_flags_reach_the_sampler",
              "test_fast_trainer_learns_the_naive_trainers_merges",
              "test_kv_cache_greedy_equals_full_reforward", "test_tasks_py_reproduces_shipped_data",
              "test_the_chunked_head_does_not_recompile_for_every_length",
              "test_generate_stops_at_stop_id_and_batches_rows",
              "test_the_split_check_passes_on_the_shipped_data",
              "test_the_split_check_fails_on_a_planted_overlap",
              "test_the_split_check_reads_on_policy_rounds"}  # seconds each


def pytest_collection_modifyitems(config, items):
    for item in items:
        if (item.module.__name__.split(".")[-1] in SLOW_MODULES
                or item.originalname in SLOW_TESTS
                or SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.slow)
