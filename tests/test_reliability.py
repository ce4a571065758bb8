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
import evaluate
import sample
import tokenizer
import train_dpo
import train_sft
from conftest import ROOT, dpo_args, in_process, max_diff, sft_args, torchrun, weights
from errors import UserError
from checkpoint import load_checkpoint, save_checkpoint
from model import ModelConfig, Transformer


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
    result = in_process(sample.main, "--ckpt", bad, "--prompt", "hi")  # as sample.py runs it
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


def test_a_stop_right_after_the_rename_stops_the_run_not_a_missing_file(tmp_path,
                                                                        monkeypatch):
    """SIGTERM's Interrupted raised just after os.replace (where a signal sent as soon as
    the checkpoint appears lands): the stop goes on up, with the new file in place, not a
    'no such file' error about the temporary name that was just renamed."""
    from checkpoint import atomic_write
    from errors import Interrupted
    real_replace = os.replace

    def replace_then_stop(a, b):
        real_replace(a, b)
        raise Interrupted("SIGTERM")
    monkeypatch.setattr(os, "replace", replace_then_stop)
    with pytest.raises(Interrupted):
        atomic_write(str(tmp_path / "sft.pt"), b"new")
    assert os.listdir(tmp_path) == ["sft.pt"] and (tmp_path / "sft.pt").read_bytes() == b"new"


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
        result = in_process(evaluate.main, "--ckpt", path, "--limit", "6", "--samples", "1",
                            "--max-new-tokens", "4", "--temperature", temperature, "--json",
                            report)
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
    result = in_process(train_dpo.main, "--sft-ckpt", "", "--data", paths["train"],
                        "--val-data", paths["val"], "--out-dir", tmp_path, "--steps", "1",
                        "--batch-size", "4", "--dim", "32", "--n-layers", "1", "--n-heads",
                        "4", "--n-kv-heads", "2", "--samples", "2", "--quiet")
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
    # 120 steps of at least 50 ms: the kill, right after the first checkpoint (step 3),
    # always lands mid-run
    proc = launch(torchrun_command(os.path.join("tests", "slow_steps.py"), args),
                  env=dict(os.environ, PYTHONPATH=ROOT))
    wait_for(tmp_path / "cut/dpo.pt", proc)
    ranks, deadline = {}, time.time() + 30
    while len(ranks) < 2:
        assert time.time() < deadline, "torchrun's two ranks were not found"
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


def two_nodes(args, port):
    nodes = [launch([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                     "--node-rank", str(rank), "--nproc-per-node", "1", "--rdzv-backend",
                     "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "minidpo-test",
                     os.path.join(ROOT, "train_dpo.py"), *args]) for rank in (0, 1)]
    return [(node, node.communicate(timeout=180)[0]) for node in nodes]


def test_two_nodes_train_the_run_of_one_process(files, sft_ckpt, tmp_path):
    args = dpo_args(files, tmp_path / "two", sft_ckpt, "--steps", "4", "--batch-size", "8")
    for attempt in range(3):  # a free port is free when asked, and may be taken after
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        runs = two_nodes(args, port)
        if all(node.returncode == 0 for node, _ in runs) or not any(
                "Address already in use" in out for _, out in runs):
            break
    for node, out in runs:
        assert node.returncode == 0, out[-3000:]
    train_dpo.main(dpo_args(files, tmp_path / "one", sft_ckpt, "--steps", "4", "--batch-size",
                            "8"))
    assert max_diff(weights(tmp_path / "one/dpo.pt"), weights(tmp_path / "two/dpo.pt")) < 1e-5


def test_a_run_resumed_under_another_launcher_continues_it(files, sft_ckpt, tmp_path):
    """The run is a function of its flags, not of its launcher, so --resume continues it
    under another world size: 2 steps in one process, 2 more under torchrun, end where 4
    steps in one process do (and the logged steps go on from 3)."""
    common = ["--steps", "4", "--batch-size", "8", "--log-every", "1", "--val-data", ""]
    train_dpo.main(dpo_args(files, tmp_path / "cut", sft_ckpt, *common, "--stop-after", "2"))
    assert load_checkpoint(str(tmp_path / "cut/dpo.pt"))["train_state"]["world_size"] == 1
    torchrun("train_dpo.py", dpo_args(files, tmp_path / "cut", sft_ckpt, *common, "--resume"))
    train_dpo.main(dpo_args(files, tmp_path / "whole", sft_ckpt, *common))
    cut = load_checkpoint(str(tmp_path / "cut/dpo.pt"))
    assert cut["train_state"]["step"] == 4 and cut["train_state"]["world_size"] == 2
    assert max_diff(cut["model"], weights(tmp_path / "whole/dpo.pt")) < 1e-5
    assert [r["step"] for r in read_metrics(tmp_path / "cut/dpo/metrics.jsonl")] == [1, 2, 3, 4]


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


# ----------------------------------------------------------------------------
# Input files that must not hurt: each refused with one clear line, before harm is done


def small_checkpoint(path, **config):
    model = Transformer(ModelConfig(vocab_size=16, dim=8, n_layers=1, n_heads=2, n_kv_heads=1,
                                    **config))
    save_checkpoint(str(path), model, {"sha256": "x", "vocab_size": 16})
    return model


def test_old_torch_is_refused_before_loading(tmp_path, monkeypatch):
    small_checkpoint(tmp_path / "a.pt")
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(UserError, match=r"torch 2.5.1\+cpu cannot load checkpoints safely"):
        load_checkpoint(str(tmp_path / "a.pt"))


def test_a_compressed_checkpoint_is_not_inflated(tmp_path):
    """torch.save stores its entries; a deflated one (a zip bomb: kilobytes that inflate
    to gigabytes) is refused from the zip directory alone."""
    import zipfile
    small_checkpoint(tmp_path / "a.pt")
    with zipfile.ZipFile(tmp_path / "a.pt") as src, zipfile.ZipFile(
            tmp_path / "bomb.pt", "w", zipfile.ZIP_DEFLATED) as dst:
        for entry in src.infolist():
            dst.writestr(entry.filename, src.read(entry))
        dst.writestr("a/data/huge", b"\0" * 50_000_000)  # 50 MB in ~50 KB
    assert os.path.getsize(tmp_path / "bomb.pt") < 200_000
    with pytest.raises(UserError, match="compressed entries.*refusing to inflate"):
        load_checkpoint(str(tmp_path / "bomb.pt"))


@pytest.mark.parametrize("change, words", [
    ({"dim": 4096}, r"does not match its config: tok_embeddings.weight \(16, 8\) \(expected "
                    r"\(16, 4096\)\)"),
    ({"vocab_size": 10 ** 12}, "does not match its config"),
    ({"n_layers": 10 ** 6}, "config n_layers is 1000000, the weights have 1"),
    ({"n_experts": 10 ** 6}, "config n_experts is 1000000, the weights have 0"),
    ({"surprise": 1}, r"unknown config keys \['surprise'\]"),
    ({"dim": "8"}, "config dim must be int, got '8'"),
    ({"n_heads": 3}, r"dim \(8\) must divide by n_heads \(3\)"),
])
def test_a_checkpoints_config_is_checked_before_any_tensor_is_allocated(tmp_path, change,
                                                                        words):
    """A 2 KB file whose config asks for a huge model is refused on the meta device (no
    memory): at most a few MB are allocated on the way (tracemalloc's peak)."""
    import tracemalloc
    small_checkpoint(tmp_path / "a.pt")
    ckpt = torch.load(tmp_path / "a.pt", weights_only=True)
    ckpt["config"].update(change)
    torch.save(ckpt, tmp_path / "bad.pt")
    from checkpoint import model_from_checkpoint
    tracemalloc.start()
    with pytest.raises(UserError, match=words):
        model_from_checkpoint(load_checkpoint(str(tmp_path / "bad.pt")), str(tmp_path / "bad.pt"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20_000_000
    result = in_process(sample.main, "--ckpt", tmp_path / "bad.pt", "--prompt", "hi")
    assert result.returncode == 1 and result.stderr.startswith("error: ")
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_a_planted_link_at_the_temporary_name_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.symlink(victim, tmp_path / "sft.pt.tmp")  # where the old code wrote first
    small_checkpoint(tmp_path / "sft.pt")
    assert victim.read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["sft.pt", "sft.pt.tmp", "victim.txt"]
    load_checkpoint(str(tmp_path / "sft.pt"))


def test_a_crafted_tokenizer_pattern_is_never_compiled(tmp_path):
    """A pre-split pattern from a file could hang or crash the regex engine (a Rust panic,
    which no except clause catches): only the known patterns are accepted."""
    path = tmp_path / "t.tiktoken"
    with open(tokenizer.DEFAULT_TOKENIZER, encoding="utf-8") as f:
        path.write_text(f.read(), encoding="utf-8")
    (tmp_path / "t.tiktoken.json").write_text(json.dumps({"pattern": "(a+)+$" * 50}))
    with pytest.raises(UserError, match="unknown pre-split 'pattern'"):
        tokenizer.load_tokenizer(str(path))
    (tmp_path / "t.tiktoken.json").write_text(json.dumps({"pattern": tokenizer.SPLIT_PATTERN}))
    assert tokenizer.load_tokenizer(str(path)).n_vocab == tokenizer.load_tokenizer().n_vocab


def test_deeply_nested_json_is_a_record_error(files, sft_ckpt, tmp_path, capsys):
    deep = "[" * 200_000 + "]" * 200_000
    bad = tmp_path / "deep.jsonl"
    with open(files["pairs_train"], encoding="utf-8") as f:
        bad.write_text(f.read() + deep + "\n", encoding="utf-8")
    args = dpo_args(files, tmp_path, sft_ckpt, "--steps", "1", "--batch-size", "4",
                    "--no-save", "--skip-invalid")
    args[args.index("--data") + 1] = str(bad)
    train_dpo.main(args)
    assert "skipped 1 invalid records: 1 JSON nested too deeply" in capsys.readouterr().out
    (tmp_path / "deep.json").write_text(deep)
    with pytest.raises(UserError, match="deep.json: JSON nested too deeply"):
        data.load_records(str(tmp_path / "deep.json"), data.preference_messages)


def test_resume_without_a_checkpoint_is_refused_and_keeps_the_metrics(files, tmp_path):
    train_sft.main(sft_args(files, tmp_path, "--steps", "2", "--batch-size", "4", "--no-save"))
    metrics = (tmp_path / "sft/metrics.jsonl").read_text()
    with pytest.raises(UserError, match="--resume: no checkpoint at .*sft.pt to continue from"):
        train_sft.main(sft_args(files, tmp_path, "--steps", "2", "--batch-size", "4",
                                "--resume"))
    assert (tmp_path / "sft/metrics.jsonl").read_text() == metrics


def test_truncation_and_template_limits_are_reported(files, sft_ckpt, tmp_path, capsys,
                                                     write_file):
    long_user = [{"role": "user", "content": "word " * 400}, {"role": "assistant",
                                                               "content": "ok"}]
    with open(files["sft_train"], encoding="utf-8") as f:
        sft = write_file("sft.jsonl", f.read() + json.dumps({"messages": long_user}) + "\n")
    train_sft.main(sft_args(files, tmp_path / "sft", "--steps", "1", "--batch-size", "4",
                            "--no-save", "--data", sft))
    assert "dropped 1 conversations (no assistant token left within --max-len 256)" in \
        capsys.readouterr().out
    with pytest.raises(UserError, match="--max-prompt-len 4 is shorter than the chat "
                                        r"template's emptiest prompt \(\d+ tokens\)"):
        train_dpo.main(dpo_args(files, tmp_path / "dpo", sft_ckpt, "--max-prompt-len", "4"))


def test_a_checkpoint_of_another_tokenizer_is_refused_through_the_script(files, sft_ckpt,
                                                                         tmp_path):
    other = tmp_path / "other.tiktoken"
    with open(tokenizer.DEFAULT_TOKENIZER, encoding="utf-8") as f:
        other.write_text("".join(f.readlines()[:300]), encoding="utf-8")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train_dpo.py"), *dpo_args(
        files, tmp_path, sft_ckpt, "--tokenizer", str(other))], capture_output=True, text=True,
        cwd=ROOT, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(f"error: {sft_ckpt}: checkpoint was trained with a "
                                    "different tokenizer")
