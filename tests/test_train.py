"""Both training scripts end to end: DDP equivalence, gradient accumulation, resume,
AMP with GradScaler, the precomputed reference, and non-finite handling."""

import functools
import json
import math
import os
import subprocess
import sys
import types
import weakref

import pytest
import torch

import data
import errors
import train_dpo
import train_sft
from conftest import ROOT, dpo_args, max_diff, sft_args, torchrun, weights
from checkpoint import load_checkpoint
from model import ModelConfig, Transformer


def logged(out, stage):
    with open(os.path.join(out, stage, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def distance(a, b):
    """L2 distance between two state dicts, over all weights."""
    return sum(((a[k] - b[k]) ** 2).sum().item() for k in a) ** 0.5


def assert_same_run(runs, stage, clip):
    """The runs logged the same steps, learning rates and gradient norms (before clipping,
    which acted on every step), and ended with the same weights."""
    logs = {name: logged(out, stage) for name, out in runs.items()}
    first, *others = runs
    for name in others:
        assert [r["step"] for r in logs[name]] == [r["step"] for r in logs[first]], name
        assert [r["lr"] for r in logs[name]] == [r["lr"] for r in logs[first]], name
        assert [r["grad_norm"] for r in logs[name]] == pytest.approx(
            [r["grad_norm"] for r in logs[first]], rel=1e-4), name
        diff = max_diff(weights(runs[first] / f"{stage}.pt"), weights(runs[name] / f"{stage}.pt"))
        assert diff < 1e-5, (name, diff)
    assert min(r["grad_norm"] for r in logs[first]) > clip  # clipping acted at every step


def test_sft_same_flags_same_run_under_python_and_torchrun(files, tmp_path):
    """--batch-size is the global batch: python, and torchrun with 2 processes, train the
    same 5 steps of 8 conversations (not 5 steps of 16)."""
    common = ["--steps", "5", "--batch-size", "8", "--grad-clip", "0.05", "--log-every", "1"]
    runs = {name: tmp_path / name for name in ("python", "torchrun")}
    train_sft.main(sft_args(files, runs["python"], *common))
    torchrun("train_sft.py", sft_args(files, runs["torchrun"], *common))
    assert_same_run(runs, "sft", 0.05)
    train_sft.main(sft_args(files, tmp_path / "still", *common, "--lr", "0"))
    still = weights(tmp_path / "still/sft.pt")  # the same start, never moved
    assert max_diff(weights(runs["python"] / "sft.pt"), still) > 1e-4  # the steps did train


def test_dpo_same_flags_same_run_under_python_torchrun_and_grad_accum(files, sft_ckpt,
                                                                    tmp_path):
    """python, python --grad-accum 2 and torchrun 2 processes --grad-accum 2 (micro-batches
    of 2 pairs on each rank): one run of 4 steps of 8 pairs, clipping acting."""
    common = ["--steps", "4", "--batch-size", "8", "--grad-clip", "0.01", "--log-every", "1"]
    runs = {name: tmp_path / name for name in ("python", "accum", "torchrun")}
    train_dpo.main(dpo_args(files, runs["python"], sft_ckpt, *common))
    train_dpo.main(dpo_args(files, runs["accum"], sft_ckpt, *common, "--grad-accum", "2"))
    torchrun("train_dpo.py", dpo_args(files, runs["torchrun"], sft_ckpt, *common,
                                      "--grad-accum", "2"))
    assert_same_run(runs, "dpo", 0.01)
    assert max_diff(weights(runs["python"] / "dpo.pt"), weights(sft_ckpt)) > 1e-4  # it trained


def test_dpo_gradient_clipping_acts_and_logs_the_norm_before_clipping(files, sft_ckpt,
                                                                     tmp_path):
    """train_dpo.py's clip_grad_norm_: with --grad-clip 0.01 (below every norm) the run ends
    elsewhere than with --grad-clip 0, and the logged norm of step 1, taken from the same
    weights and batch in both runs, is the unclipped one in both. AdamW divides out a
    gradient's scale, so clipping shows only through the norms changing from step to step:
    no warm-up, so the 3 steps move the weights enough to see it (1.3e-4 apart, measured)."""
    common = ["--steps", "3", "--batch-size", "8", "--log-every", "1", "--val-data", "",
              "--warmup-steps", "0"]
    train_dpo.main(dpo_args(files, tmp_path / "clip", sft_ckpt, *common, "--grad-clip", "0.01"))
    train_dpo.main(dpo_args(files, tmp_path / "free", sft_ckpt, *common, "--grad-clip", "0"))
    clip, free = logged(tmp_path / "clip", "dpo"), logged(tmp_path / "free", "dpo")
    assert clip[0]["grad_norm"] == pytest.approx(free[0]["grad_norm"], rel=1e-6)
    assert min(r["grad_norm"] for r in clip) > 0.01
    assert max_diff(weights(tmp_path / "clip/dpo.pt"), weights(tmp_path / "free/dpo.pt")) > 1e-5


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_sft_interrupted_and_resumed_equals_uninterrupted(files, tmp_path, dtype):
    common = ["--steps", "6", "--batch-size", "8", "--dtype", dtype, "--grad-accum", "2"]
    train_sft.main(sft_args(files, tmp_path / "a", *common))
    train_sft.main(sft_args(files, tmp_path / "b", *common, "--stop-after", "3"))
    assert load_checkpoint(str(tmp_path / "b/sft.pt"))["train_state"]["step"] == 3
    train_sft.main(sft_args(files, tmp_path / "b", *common, "--resume"))
    a, b = load_checkpoint(str(tmp_path / "a/sft.pt")), load_checkpoint(str(tmp_path / "b/sft.pt"))
    assert max_diff(a["model"], b["model"]) == 0  # bit-equal
    sa, sb = a["train_state"]["scaler"], b["train_state"]["scaler"]
    assert sa == sb
    if dtype == "float16":
        assert sa["scale"] > 0 and "_growth_tracker" in sa


def test_packed_dpo_on_two_processes_equals_one_process_padded(files, sft_ckpt, tmp_path):
    common = ["--steps", "3", "--eval-every", "2"]  # the held-out pass is packed too
    train_dpo.main(dpo_args(files, tmp_path / "one", sft_ckpt, *common, "--batch-size", "8"))
    torchrun("train_dpo.py", dpo_args(files, tmp_path / "two", sft_ckpt, *common,
                                      "--batch-size", "8", "--packed"))
    assert max_diff(weights(tmp_path / "one/dpo.pt"), weights(tmp_path / "two/dpo.pt")) < 1e-5
    val = [[r["val/loss"] for r in map(json.loads, open(tmp_path / d / "dpo/metrics.jsonl"))
            if "val/loss" in r] for d in ("one", "two")]
    assert len(val[0]) == 2 and max(abs(a - b) for a, b in zip(*val)) < 1e-5


def test_dpo_resume_with_precomputed_reference_is_bit_equal(files, sft_ckpt, tmp_path):
    common = ["--steps", "6", "--batch-size", "8", "--precompute-ref"]
    train_dpo.main(dpo_args(files, tmp_path / "a", sft_ckpt, *common))
    train_dpo.main(dpo_args(files, tmp_path / "b", sft_ckpt, *common, "--stop-after", "2"))
    train_dpo.main(dpo_args(files, tmp_path / "b", sft_ckpt, *common, "--resume"))
    assert max_diff(weights(tmp_path / "a/dpo.pt"), weights(tmp_path / "b/dpo.pt")) == 0
    assert len(os.listdir(tmp_path / "b/dpo")) == 2  # metrics.jsonl and one reference cache


def test_precomputed_reference_equals_on_the_fly_and_frees_the_model(files, sft_ckpt,
                                                                      tmp_path, monkeypatch):
    common = ["--steps", "5", "--batch-size", "8"]
    train_dpo.main(dpo_args(files, tmp_path / "fly", sft_ckpt, *common))
    made, seen = [], []
    real_deepcopy, real_reference_logps = train_dpo.copy.deepcopy, train_dpo.reference_logps

    def deepcopy(model):
        ref = real_deepcopy(model)
        made.append(weakref.ref(ref))
        return ref

    def reference_logps(reference, table, *args):
        seen.append((reference is None, made[0]() is None))
        return real_reference_logps(reference, table, *args)

    monkeypatch.setattr(train_dpo, "copy", types.SimpleNamespace(deepcopy=deepcopy))
    monkeypatch.setattr(train_dpo, "reference_logps", reference_logps)
    train_dpo.main(dpo_args(files, tmp_path / "pre", sft_ckpt, *common, "--precompute-ref"))
    assert seen and all(none and freed for none, freed in seen)
    fly, pre = weights(tmp_path / "fly/dpo.pt"), weights(tmp_path / "pre/dpo.pt")
    assert max_diff(fly, pre) < 1e-5


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_step_with_non_finite_gradients_is_skipped_and_counted(files, tmp_path, monkeypatch,
                                                                 dtype):
    """The loop's AMP step (train_sft.py, section 6): the gradients of step 2 made infinite,
    its loss finite. That step changes no weight and is counted; the next one trains; with
    float16 the GradScaler halves its scale."""
    real, calls = train_sft.response_logps, []

    def infinite_gradients_at_step_2(*args, **kwargs):
        logps, n_tokens = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            logps.register_hook(lambda grad: grad * float("inf"))
        return logps, n_tokens

    common = ["--steps", "3", "--batch-size", "8", "--dtype", dtype, "--log-every", "1",
              "--val-data", ""]
    train_sft.main(sft_args(files, tmp_path / "one", *common, "--stop-after", "1"))
    monkeypatch.setattr(train_sft, "response_logps", infinite_gradients_at_step_2)
    train_sft.main(sft_args(files, tmp_path / "two", *common, "--stop-after", "2"))
    calls.clear()
    train_sft.main(sft_args(files, tmp_path / "three", *common))
    one, two = load_checkpoint(str(tmp_path / "one/sft.pt")), load_checkpoint(
        str(tmp_path / "two/sft.pt"))
    assert max_diff(one["model"], two["model"]) == 0  # step 2 was not applied
    assert max_diff(one["model"], weights(tmp_path / "three/sft.pt")) > 0  # step 3 was
    with open(tmp_path / "three/sft/metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["skipped_steps"] for r in records] == [0, 1, 1]
    assert not math.isfinite(records[1]["grad_norm"]) and math.isfinite(records[2]["grad_norm"])
    if dtype == "float16":
        assert two["train_state"]["scaler"]["scale"] == one["train_state"]["scaler"]["scale"] / 2


def test_float16_dpo_runs_and_counts_skips(files, sft_ckpt, tmp_path, monkeypatch):
    """The GradScaler halves its scale on each step it skips (overflowing gradients) and,
    with growth_interval 2000, never grows in 12 steps: so the skips logged must equal
    log2(initial / final scale). Started at 2^24 (PyTorch's default is 2^16), the first
    step overflows; the counter then rises by one on each skipped step and by none on a
    step taken (a later step may overflow again at the scale an earlier one passed)."""
    init = 2.0 ** 24
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler,
                                                                   init_scale=init))
    train_dpo.main(dpo_args(files, tmp_path, sft_ckpt, "--steps", "12", "--batch-size", "4",
                            "--dtype", "float16", "--log-every", "1"))
    with open(tmp_path / "dpo/metrics.jsonl") as f:
        log = [json.loads(line) for line in f]
    ckpt = load_checkpoint(str(tmp_path / "dpo.pt"))
    skipped = log[-1]["skipped_steps"]
    assert 1 <= skipped < 12 and skipped == math.log2(init / ckpt["train_state"]["scaler"]["scale"])
    counts = [r["skipped_steps"] for r in log]
    assert counts[0] == 1 and all(b - a in (0, 1) for a, b in zip(counts, counts[1:]))
    assert max_diff(ckpt["model"], weights(sft_ckpt)) > 0  # the steps after them trained


def test_non_finite_loss_in_float32_stops_with_a_clear_message(files, sft_ckpt, tmp_path,
                                                               monkeypatch):
    calls = []
    real_dpo_loss = train_dpo.dpo_loss

    def poisoned_dpo_loss(*args, **kwargs):  # the 4th step's loss is NaN
        calls.append(1)
        losses, chosen, rejected = real_dpo_loss(*args, **kwargs)
        return (losses * float("nan") if len(calls) == 4 else losses), chosen, rejected

    monkeypatch.setattr(train_dpo, "dpo_loss", poisoned_dpo_loss)
    with pytest.raises(errors.NonFiniteLoss, match="at step 3 .*last good one"):
        train_dpo.main(dpo_args(files, tmp_path, sft_ckpt, "--steps", "8", "--batch-size",
                                "4", "--save-every", "2", "--eval-every", "0"))
    assert len(calls) == 4  # stopped at once
    ckpt = load_checkpoint(str(tmp_path / "dpo.pt"))
    assert ckpt["train_state"]["step"] == 2  # the last good checkpoint, intact
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_sft_then_dpo_end_to_end_under_torchrun(files, tmp_path):
    torchrun("train_sft.py", sft_args(files, tmp_path, "--steps", "20", "--batch-size", "8"))
    out = torchrun("train_dpo.py", dpo_args(files, tmp_path, tmp_path / "sft.pt", "--steps",
                                            "16", "--batch-size", "8", "--lr", "2e-3",
                                            "--log-every", "1", "--sft-alpha", "0"))
    assert "pairs/s" in out
    with open(tmp_path / "dpo/metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert records[0]["step"] == 1 and abs(records[0]["loss"] - math.log(2)) < 1e-6
    assert records[0]["rewards/chosen"] == records[0]["rewards/margins"] == 0
    late = [r["rewards/accuracies"] for r in records[-4:]]
    assert sum(late) / len(late) > 0.5
    result = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt",
                             str(tmp_path / "dpo.pt"), "--prompt", "What is 7 + 5?",
                             "--max-new-tokens", "8"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0 and "dpo.pt:" in result.stdout, result.stderr


def test_sft_logs_the_token_mean_nll_of_its_batch(files, tmp_path, enc):
    """train_sft.py's loss, checked against a value computed apart: with --lr 0 the saved
    weights are the ones the first step ran with, so the logged loss must be the mean
    over the batch's assistant tokens (prompt and padding excluded) of -log p, worked
    out here with a full forward and log_softmax."""
    train_sft.main(sft_args(files, tmp_path, "--steps", "1", "--batch-size", "8", "--lr", "0",
                            "--log-every", "1", "--val-data", ""))
    model = Transformer(ModelConfig(**load_checkpoint(str(tmp_path / "sft.pt"))["config"]))
    model.load_state_dict(weights(tmp_path / "sft.pt"))
    ds = data.SFTDataset(files["sft_train"], enc, 256, log=None)
    batch = data.BatchOrder(ds.lengths(), 8, 3, group_by_length=True)(0)[0]  # seed 3, step 0
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in batch:
            ids, mask = ds[i]
            log_probs = model(torch.tensor([ids])).log_softmax(-1)[0]  # (T, V)
            for t in range(1, len(ids)):
                if mask[t]:  # an assistant token, predicted at t - 1
                    nll -= log_probs[t - 1, ids[t]].item()
                    n += 1
    with open(tmp_path / "sft/metrics.jsonl") as f:
        logged = json.loads(f.readline())
    assert n > 0 and logged["loss"] == pytest.approx(nll / n, rel=1e-5)


def test_float16_sft_logs_the_unscaled_norm_and_follows_float32(files, tmp_path):
    """train_sft.py's GradScaler: the gradients are unscaled before they are clipped and
    logged, so float16 logs float32's gradient norm (not one 2^16 times larger) and ends
    near the float32 run (measured: 0.009 apart against 2.4 moved; with unscale_ skipped,
    norms of 52,000-122,000 and 1.8 apart)."""
    common = ["--steps", "4", "--batch-size", "4", "--grad-clip", "1", "--log-every", "1"]
    for dtype in ("float32", "float16"):
        train_sft.main(sft_args(files, tmp_path / dtype, *common, "--dtype", dtype))
    train_sft.main(sft_args(files, tmp_path / "start", *common, "--lr", "0"))
    fp32, fp16 = logged(tmp_path / "float32", "sft"), logged(tmp_path / "float16", "sft")
    assert [r["grad_norm"] for r in fp16] == pytest.approx([r["grad_norm"] for r in fp32],
                                                            rel=1e-3)
    ends = {name: weights(tmp_path / name / "sft.pt") for name in ("float32", "float16", "start")}
    assert distance(ends["float16"], ends["float32"]) < 0.1 * distance(ends["float32"],
                                                                        ends["start"])


def test_float16_training_follows_float32(files, sft_ckpt, tmp_path):
    """With the GradScaler (scale, unscale before clipping, step) float16 trains like
    float32: the two runs end far closer to each other than to where they started (L2
    over all weights). Clipping the still-scaled gradients would take float16 elsewhere."""
    common = ["--steps", "4", "--batch-size", "4", "--grad-clip", "1"]
    train_dpo.main(dpo_args(files, tmp_path / "fp32", sft_ckpt, *common))
    train_dpo.main(dpo_args(files, tmp_path / "fp16", sft_ckpt, *common, "--dtype", "float16"))
    fp32, fp16 = weights(tmp_path / "fp32/dpo.pt"), weights(tmp_path / "fp16/dpo.pt")
    assert load_checkpoint(str(tmp_path / "fp16/dpo.pt"))["train_state"]["scaler"]["scale"] > 0
    start = weights(sft_ckpt)
    # measured: 0.003 of the way; with the gradients clipped while still scaled, 0.63
    assert distance(fp16, fp32) < 0.1 * distance(fp32, start)
