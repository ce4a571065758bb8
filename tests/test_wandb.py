"""--wandb PROJECT: the records metrics.jsonl gets go to wandb as well, from rank 0 only;
tested with a stand-in `wandb` module that writes down every call it gets."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from conftest import ROOT, dpo_args, sft_args, torchrun

STAND_IN = '''
import json, os

def _note(kind, **fields):
    with open(os.environ["STAND_IN_LOG"], "a") as f:
        f.write(json.dumps({"kind": kind, "rank": os.environ.get("RANK", "none"), **fields})
                + "\\n")

class Run:
    def log(self, data, step=None):
        _note("log", data=data, step=step)

def init(project=None, config=None, name=None, **kwargs):
    _note("init", project=project, lr=config["lr"], name=name)
    return Run()
'''


def stand_in_env(tmp_path, module_text=STAND_IN):
    folder = tmp_path / "stand_in"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wandb.py").write_text(module_text)
    log = tmp_path / "calls.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), ROOT]),
           "STAND_IN_LOG": str(log)}
    return env, log


def calls(log):
    return [json.loads(line) for line in log.read_text().splitlines()]


def metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sft_and_torchrun_dpo_records_reach_wandb_from_rank_0(files, sft_ckpt, tmp_path,
                                                              monkeypatch):
    """train_sft.py and, beside it, train_dpo.py under torchrun, each with its own
    stand-in's log."""
    env, log = stand_in_env(tmp_path / "sft_wandb")
    out = tmp_path / "sft"
    cmd = [sys.executable, os.path.join(ROOT, "train_sft.py"),
           *sft_args(files, out, "--steps", "6", "--log-every", "2", "--wandb", "proj-sft")]
    dpo_env, dpo_log = stand_in_env(tmp_path / "dpo_wandb")
    for name, value in dpo_env.items():
        monkeypatch.setenv(name, value)  # torchrun's environment
    with ThreadPoolExecutor(2) as pool:
        sft_run = pool.submit(subprocess.run, cmd, cwd=ROOT, env=env, capture_output=True,
                              text=True)
        pool.submit(torchrun, "train_dpo.py", dpo_args(
            files, tmp_path / "dpo", sft_ckpt, "--steps", "4", "--log-every", "1",
            "--batch-size", "2", "--wandb", "proj-dpo")).result()
        result = sft_run.result()
    assert result.returncode == 0, result.stderr[-2000:]
    seen = calls(log)
    assert [c["kind"] for c in seen] == ["init"] + ["log"] * 3
    assert seen[0]["project"] == "proj-sft" and seen[0]["lr"] == 3e-3
    assert "sft" in seen[0]["name"]
    records = metrics(out / "sft" / "metrics.jsonl")
    assert [c["data"] for c in seen[1:]] == records  # exactly the records, every one
    assert [c["step"] for c in seen[1:]] == [r["step"] for r in records] == [2, 4, 6]

    seen = calls(dpo_log)
    assert {c["rank"] for c in seen} == {"0"}  # rank 1 is silent
    assert [c["kind"] for c in seen].count("init") == 1
    assert [c["data"] for c in seen if c["kind"] == "log"] == metrics(
        tmp_path / "dpo" / "dpo" / "metrics.jsonl")


def test_without_wandb_installed_one_line_says_what_to_install(files, tmp_path):
    env, _ = stand_in_env(tmp_path, "raise ImportError('No module named wandb')\n")
    cmd = [sys.executable, os.path.join(ROOT, "train_sft.py"),
           *sft_args(files, tmp_path / "out", "--steps", "2", "--wandb", "proj")]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr == "error: --wandb needs the wandb package: pip install wandb\n"
