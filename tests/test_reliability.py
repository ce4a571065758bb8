"""Reliability, tried the way a user reaches each feature: flags through the scripts, bad
files through the readers, two ranks through torchrun, and faults (a killed rank, a NaN
on one rank, two nodes, SIGTERM) that must end cleanly, never hang."""

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import data
import tokenizer
import train_dpo
import train_sft
from conftest import ROOT, dpo_args, max_diff, sft_args, torchrun, weights
from errors import UserError
from model import ModelConfig, Transformer, load_checkpoint, save_checkpoint


def read_metrics(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------
# Defects, each through the script or public function a user calls


def test_reference_free_trains_and_evaluates_through_the_script(files, sft_ckpt, tmp_path):
    train_dpo.main(dpo_args(files, tmp_path, sft_ckpt, "--steps", "3", "--batch-size", "4",
                            "--reference-free", "--eval-every", "2", "--log-every", "1",
                            "--beta", "0.1"))
    records = read_metrics(tmp_path / "dpo/metrics.jsonl")
    first = records[0]
    # no reference: the reward is beta * log pi(y|x) itself, so chosen reward = beta * logps
    assert first["rewards/chosen"] == pytest.approx(0.1 * first["logps/chosen"], rel=1e-5)
    assert "val/loss" in records[1] and math.isfinite(records[-1]["val/loss"])


@pytest.mark.parametrize("script", ["train_sft.py", "train_dpo.py"])
def test_two_ranks_with_a_one_example_validation_file_do_not_hang(files, sft_ckpt, tmp_path,
                                                                   script):
    source = files["sft_val" if script == "train_sft.py" else "pairs_val"]
    one = tmp_path / "one.jsonl"
    with open(source, encoding="utf-8") as f:
        one.write_text(f.readline(), encoding="utf-8")
    args = (sft_args(files, tmp_path, "--steps", "3", "--batch-size", "2")
            if script == "train_sft.py" else
            dpo_args(files, tmp_path, sft_ckpt, "--steps", "3", "--batch-size", "2"))
    args[args.index("--val-data") + 1] = str(one)
    out = torchrun(script, args + ["--eval-every", "1"], timeout=120)
    assert "val loss" in out and "done: 3 steps" in out


BAD_CHECKPOINTS = {
    "empty": (lambda good: b"", "empty"),
    "truncated": (lambda good: good[:len(good) // 2], "corrupt or cut short"),
    "text": (lambda good: b"hello, I am a text file\n" * 20, "not a minidpo checkpoint"),
    "random bytes": (lambda good: random.Random(0).randbytes(4096), "not a minidpo checkpoint"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_files_are_clear_errors(tmp_path, kind):
    good = tmp_path / "good.pt"
    save_checkpoint(str(good), Transformer(ModelConfig(vocab_size=16, dim=8, n_layers=1,
                                                       n_heads=2, n_kv_heads=1)),
                    {"sha256": "x", "vocab_size": 16})
    make, words = BAD_CHECKPOINTS[kind]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(make(good.read_bytes()))
    with pytest.raises(ValueError, match=f"{bad}: .*{words}"):
        load_checkpoint(str(bad))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt",
                             str(bad), "--prompt", "hi"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 1 and result.stderr.startswith(f"error: {bad}: ")
    assert len(result.stderr.splitlines()) == 1, result.stderr


class NotATensor:
    pass


def test_checkpoints_with_objects_or_from_a_newer_version_are_refused(tmp_path):
    path = tmp_path / "object.pt"
    torch.save({"model": {}, "config": {}, "tokenizer": {}, "x": NotATensor()}, path)
    with pytest.raises(ValueError, match="holds pickled objects"):
        load_checkpoint(str(path))
    path = tmp_path / "newer.pt"
    torch.save({"format": 99, "model": {}, "config": {}, "tokenizer": {}}, path)
    with pytest.raises(ValueError, match="written by a newer minidpo"):
        load_checkpoint(str(path))


def test_dropout_flag_is_off_in_the_dpo_policy(files, tmp_path):
    # --lr 0: the policy never moves, so without dropout it equals the reference and the
    # first loss is exactly ln 2; dropout left on in the policy would make it differ.
    args = dpo_args(files, tmp_path, "", "--steps", "1", "--batch-size", "8", "--lr", "0",
                    "--sft-alpha", "0", "--dropout", "0.5", "--dim", "32", "--n-layers", "2",
                    "--n-heads", "4", "--n-kv-heads", "2", "--log-every", "1")
    train_dpo.main(args)
    assert read_metrics(tmp_path / "dpo/metrics.jsonl")[0]["loss"] == pytest.approx(
        math.log(2), abs=1e-6)
    assert load_checkpoint(str(tmp_path / "dpo.pt"))["config"]["dropout"] == 0.0


def test_resume_refuses_a_different_run(files, sft_ckpt, tmp_path):
    common = ["--steps", "4", "--batch-size", "4"]
    train_dpo.main(dpo_args(files, tmp_path, sft_ckpt, *common, "--stop-after", "1"))
    with pytest.raises(UserError, match=r"(?s)another run.*batch_size: 4 in the checkpoint, "
                                         r"8 now.*beta"):
        train_dpo.main(dpo_args(files, tmp_path, sft_ckpt, "--steps", "4", "--batch-size",
                                "8", "--beta", "0.5", "--resume"))
    other = tmp_path / "other.jsonl"
    with open(files["pairs_train"], encoding="utf-8") as f:
        other.write_text("".join(f.readlines()[::-1]), encoding="utf-8")
    args = dpo_args(files, tmp_path, sft_ckpt, *common, "--resume")
    args[args.index("--data") + 1] = str(other)
    with pytest.raises(UserError, match="data_sha256"):
        train_dpo.main(args)
    train_dpo.main(dpo_args(files, tmp_path, sft_ckpt, *common, "--resume"))  # same run: fine
    assert load_checkpoint(str(tmp_path / "dpo.pt"))["train_state"]["step"] == 4


def test_files_are_fsynced_before_they_replace_the_old_one(files, sft_ckpt, tmp_path,
                                                           monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(f"replace {b}"),
                                                     real_replace(a, b)))
    train_dpo.main(dpo_args(files, tmp_path, sft_ckpt, "--steps", "1", "--batch-size", "4",
                            "--precompute-ref"))
    tokenizer.save_tiktoken(tokenizer.train_bpe(["some text to learn"], 262)[1],
                            str(tmp_path / "t.tiktoken"))
    replaced = [i for i, e in enumerate(events) if e.startswith("replace")]
    assert len(replaced) == 3  # the reference cache, the checkpoint, the tokenizer
    for i in replaced:
        assert events[i - 1] == "fsync"  # the data is on disk before the rename


def test_json_extension_in_capitals_reads_an_array(write_file, enc):
    path = write_file("pairs.JSON", json.dumps([{"prompt": "Q", "chosen": "a",
                                                 "rejected": "b"}]))
    assert len(data.PreferenceDataset(path, enc, log=None)) == 1


def test_evaluate_reports_kl_only_at_temperature_one(tmp_path):
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, Transformer(ModelConfig(vocab_size=1536, dim=32, n_layers=1,
                                                  n_heads=4, n_kv_heads=2)),
                    tokenizer.tokenizer_identity())
    for temperature, has_kl in (("0.7", False), ("1.0", True)):
        report = str(tmp_path / f"t{temperature}.json")
        result = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--ckpt",
                                 path, "--limit", "6", "--samples", "1", "--max-new-tokens",
                                 "4", "--temperature", temperature, "--json", report],
                                capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        with open(report) as f:
            keys = json.load(f)["results"][path]
        assert any("kl_vs_ref" in k for k in keys) == has_kl
        assert ("no KL" in result.stdout) != has_kl


def test_samples_on_your_own_data_are_your_own_prompts(tmp_path):
    pairs = [{"prompt": f"Translate into French: word number {i}", "chosen": f"mot {i}",
              "rejected": "no"} for i in range(40)]
    paths = {}
    for name, rows in (("train", pairs[:32]), ("val", pairs[32:])):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train_dpo.py"), "--sft-ckpt",
                             "", "--data", str(paths["train"]), "--val-data", str(paths["val"]),
                             "--out-dir", str(tmp_path), "--steps", "1", "--batch-size", "4",
                             "--dim", "32", "--n-layers", "1", "--n-heads", "4",
                             "--n-kv-heads", "2", "--samples", "2", "--quiet"],
                            capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "word number 32" in result.stdout and "word number 33" in result.stdout
    assert "judge" not in result.stdout and "What is" not in result.stdout


# ----------------------------------------------------------------------------
# Faults to survive


def children(pid):
    """Processes whose parent is pid, with their environment's RANK."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
            out[int(entry)] = int(env.get(b"RANK", b"-1"))
        except (OSError, ValueError, IndexError):
            continue
    return out


def torchrun_command(script, args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            os.path.join(ROOT, script), *args]


def launch(cmd, **kwargs):
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kwargs)


def wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


def test_a_rank_killed_stops_the_other_and_resume_ends_where_it_would_have(files, sft_ckpt,
                                                                           tmp_path):
    common = ["--steps", "120", "--batch-size", "4", "--save-every", "3", "--eval-every", "0",
              "--val-data", ""]
    args = dpo_args(files, tmp_path / "cut", sft_ckpt, *common)
    proc = launch(torchrun_command("train_dpo.py", args))
    wait_for(tmp_path / "cut/dpo.pt", proc)
    ranks = {}
    while len(ranks) < 2:
        ranks = {rank: pid for pid, rank in children(proc.pid).items()}
    os.kill(ranks[1], signal.SIGKILL)
    try:
        out, _ = proc.communicate(timeout=90)  # torchrun stops rank 0: no hang
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode != 0, out[-2000:]
    step = load_checkpoint(str(tmp_path / "cut/dpo.pt"))["train_state"]["step"]
    assert 3 <= step < 120 and step % 3 == 0
    torchrun("train_dpo.py", args + ["--resume"])
    torchrun("train_dpo.py", dpo_args(files, tmp_path / "whole", sft_ckpt, *common))
    assert max_diff(weights(tmp_path / "cut/dpo.pt"), weights(tmp_path / "whole/dpo.pt")) < 1e-6


def test_a_nan_loss_on_one_rank_stops_both_ranks(files, sft_ckpt, tmp_path):
    cmd = torchrun_command(os.path.join("tests", "nan_on_rank1.py"),
                           dpo_args(files, tmp_path, sft_ckpt, "--steps", "8", "--batch-size", "4"))
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "loss became nan at step 2" in out, out[-3000:]


def test_two_nodes_equal_one_process_with_twice_the_batch(files, sft_ckpt, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = dpo_args(files, tmp_path / "two", sft_ckpt, "--steps", "4", "--batch-size", "4")
    nodes = [launch([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                     "--node-rank", str(rank), "--nproc-per-node", "1", "--rdzv-backend",
                     "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "minidpo-test",
                     os.path.join(ROOT, "train_dpo.py"), *args]) for rank in (0, 1)]
    for node in nodes:
        out, _ = node.communicate(timeout=180)
        assert node.returncode == 0, out[-3000:]
    train_dpo.main(dpo_args(files, tmp_path / "one", sft_ckpt, "--steps", "4", "--batch-size",
                            "8"))
    assert max_diff(weights(tmp_path / "one/dpo.pt"), weights(tmp_path / "two/dpo.pt")) < 1e-5


def test_sigterm_stops_with_a_message_and_the_checkpoint_intact(files, tmp_path):
    args = sft_args(files, tmp_path, "--steps", "400", "--batch-size", "4", "--save-every",
                    "2", "--eval-every", "0")
    proc = launch([sys.executable, os.path.join(ROOT, "train_sft.py"), *args])
    wait_for(tmp_path / "sft.pt", proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "stopped by SIGTERM" in out and "Traceback" not in out
    step = load_checkpoint(str(tmp_path / "sft.pt"))["train_state"]["step"]
    assert 2 <= step < 400
    train_sft.main(args + ["--resume", "--stop-after", "2"])  # and it resumes
    assert load_checkpoint(str(tmp_path / "sft.pt"))["train_state"]["step"] == step + 2
