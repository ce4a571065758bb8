"""Every command-line flag, passed the way a user passes it, with its effect checked where
a number can show it (the loss of each --loss at step 0, the schedule's last lr, ...)."""

import json
import math
import os
import subprocess
import sys

import pytest

import train_dpo
import train_sft
import training
from conftest import ROOT, SHAPE, dpo_args, max_diff, sft_args, weights
from model import load_checkpoint
from tokenizer import DEFAULT_TOKENIZER


def records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def run_script(script, *args, timeout=180):
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.parametrize("loss, beta, smoothing, step0", [
    ("sigmoid", 0.1, 0.0, math.log(2)),  # -log sigma(0)
    ("sigmoid", 0.1, 0.2, math.log(2)),  # conservative: ln 2 too at h = 0
    ("ipo", 0.1, 0.0, (1 / (2 * 0.1)) ** 2),  # (0 - 1/(2 beta))^2 = 25
    ("hinge", 0.5, 0.0, 1.0),  # max(0, 1 - 0)
    ("robust", 0.1, 0.2, math.log(2)),  # ((1 - eps) ln 2 - eps ln 2) / (1 - 2 eps)
    ("norm", 1.0, 0.0, math.log(2)),
    ("dpop", 0.1, 0.0, math.log(2)),  # the penalty is 0 while pi = pi_ref
    ("bco_pair", 0.1, 0.0, 2 * math.log(2)),  # delta is 0 at the start
    ("nca_pair", 0.1, 0.0, 2 * math.log(2)),  # ln 2 + ln 2 / 2 + ln 2 / 2
    ("apo_zero", 0.1, 0.0, 1.0),  # (1 - 1/2) + 1/2
    ("sppo_hard", 0.1, 0.0, 2 * (1 / (2 * 0.1)) ** 2),  # 25 + 25
])
def test_each_loss_flag_gives_its_formula_at_step_zero(files, sft_ckpt, tmp_path, loss, beta,
                                                        smoothing, step0):
    train_dpo.main(dpo_args(files, tmp_path, sft_ckpt, "--steps", "2", "--batch-size", "4",
                            "--loss", loss, "--beta", str(beta), "--label-smoothing",
                            str(smoothing), "--sft-alpha", "0", "--log-every", "1"))
    assert records(tmp_path / "dpo/metrics.jsonl")[0]["loss"] == pytest.approx(step0, rel=1e-6)


def test_rdpo_alpha_zero_is_dpo_and_alpha_reaches_the_loss(files, sft_ckpt, tmp_path):
    common = ["--steps", "2", "--batch-size", "4", "--precompute-ref", "--log-every", "1"]
    train_dpo.main(dpo_args(files, tmp_path / "dpo", sft_ckpt, *common))
    train_dpo.main(dpo_args(files, tmp_path / "r0", sft_ckpt, *common, "--loss", "rdpo",
                            "--rdpo-alpha", "0"))
    train_dpo.main(dpo_args(files, tmp_path / "r1", sft_ckpt, *common, "--loss", "rdpo",
                            "--rdpo-alpha", "0.5"))
    assert max_diff(weights(tmp_path / "dpo/dpo.pt"), weights(tmp_path / "r0/dpo.pt")) == 0
    assert records(tmp_path / "r1/dpo/metrics.jsonl")[0]["loss"] != pytest.approx(math.log(2))


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_losses_need_no_reference_and_their_flags_count(files, sft_ckpt,
                                                                       tmp_path, capsys, loss):
    """SimPO and ORPO never build a reference (no cache is computed with --precompute-ref);
    a larger SimPO margin gamma gives a larger loss for the same policy."""
    common = ["--steps", "1", "--batch-size", "4", "--precompute-ref", "--log-every", "1",
              "--loss", loss, "--no-save"]
    train_dpo.main(dpo_args(files, tmp_path / "a", sft_ckpt, *common))
    assert "reference log-probs" not in capsys.readouterr().out
    first = records(tmp_path / "a/dpo/metrics.jsonl")[0]
    assert math.isfinite(first["loss"]) and first["loss"] > 0
    if loss == "simpo":
        train_dpo.main(dpo_args(files, tmp_path / "b", sft_ckpt, *common, "--simpo-gamma", "3"))
        assert records(tmp_path / "b/dpo/metrics.jsonl")[0]["loss"] > first["loss"]
    else:  # ORPO = NLL of the chosen answer + beta * odds-ratio loss, so > the NLL alone
        assert first["loss/dpo"] > first["loss/nll"] > 0


def test_dpop_lambda_reaches_the_loss(files, sft_ckpt, tmp_path):
    common = ["--steps", "4", "--batch-size", "4", "--precompute-ref", "--log-every", "1",
              "--loss", "dpop"]
    train_dpo.main(dpo_args(files, tmp_path / "a", sft_ckpt, *common, "--dpop-lambda", "0"))
    train_dpo.main(dpo_args(files, tmp_path / "b", sft_ckpt, *common, "--dpop-lambda", "500"))
    assert max_diff(weights(tmp_path / "a/dpo.pt"), weights(tmp_path / "b/dpo.pt")) > 0


def test_trdpo_hard_sync_every_step_keeps_the_loss_at_ln2(files, sft_ckpt, tmp_path):
    """--sync-ref-every 1 --sync-ref-alpha 1 copies the policy into the reference after
    each step, so every step starts at policy = reference: h = 0, loss ln 2, rewards 0."""
    common = ["--steps", "4", "--batch-size", "4", "--log-every", "1", "--no-save"]
    train_dpo.main(dpo_args(files, tmp_path / "tr", sft_ckpt, *common, "--sync-ref-every", "1",
                            "--sync-ref-alpha", "1"))
    for r in records(tmp_path / "tr/dpo/metrics.jsonl"):
        assert r["loss/dpo"] == pytest.approx(math.log(2), abs=1e-6)
    train_dpo.main(dpo_args(files, tmp_path / "fixed", sft_ckpt, *common))
    assert records(tmp_path / "fixed/dpo/metrics.jsonl")[-1]["loss/dpo"] != pytest.approx(
        math.log(2), abs=1e-3)


@pytest.mark.parametrize("bad", [["--precompute-ref"], ["--reference-free"],
                                 ["--loss", "simpo"]])
def test_trdpo_is_refused_without_a_reference_model(files, sft_ckpt, tmp_path, bad):
    with pytest.raises(SystemExit):
        train_dpo.main(dpo_args(files, tmp_path, sft_ckpt, "--sync-ref-every", "2", *bad))


def test_trdpo_and_bco_resume_exactly(files, sft_ckpt, tmp_path):
    """Their state across steps (the moving reference, BCO's delta) is in the checkpoint."""
    common = ["--steps", "6", "--batch-size", "4", "--loss", "bco_pair", "--sync-ref-every",
              "2", "--sync-ref-alpha", "0.5"]
    train_dpo.main(dpo_args(files, tmp_path / "a", sft_ckpt, *common))
    train_dpo.main(dpo_args(files, tmp_path / "b", sft_ckpt, *common, "--stop-after", "3"))
    train_dpo.main(dpo_args(files, tmp_path / "b", sft_ckpt, *common, "--resume"))
    assert max_diff(weights(tmp_path / "a/dpo.pt"), weights(tmp_path / "b/dpo.pt")) == 0


def test_chunked_head_trains_the_same_weights(files, sft_ckpt, tmp_path):
    # lr 1e-4: Adam's first steps move a weight by ~lr whatever the size of its gradient, so
    # at 1e-3 the last-bit differences of two fp32 summation orders grew to 5e-5 in 3 steps
    common = ["--steps", "3", "--batch-size", "4", "--precompute-ref", "--group-by-length",
              "--lr", "1e-4"]
    train_dpo.main(dpo_args(files, tmp_path / "plain", sft_ckpt, *common))
    train_dpo.main(dpo_args(files, tmp_path / "chunked", sft_ckpt, *common, "--chunked-head"))
    assert max_diff(weights(tmp_path / "plain/dpo.pt"), weights(tmp_path / "chunked/dpo.pt")) < 1e-5


def test_packed_trains_the_same_weights_as_padded_rows(files, sft_ckpt, tmp_path):
    # reference forward every step (no --precompute-ref): policy and reference both packed
    common = ["--steps", "3", "--batch-size", "4"]
    train_dpo.main(dpo_args(files, tmp_path / "plain", sft_ckpt, *common))
    train_dpo.main(dpo_args(files, tmp_path / "packed", sft_ckpt, *common, "--packed"))
    train_dpo.main(dpo_args(files, tmp_path / "both", sft_ckpt, *common, "--packed",
                            "--chunked-head"))
    plain = weights(tmp_path / "plain/dpo.pt")
    assert max_diff(plain, weights(tmp_path / "packed/dpo.pt")) < 1e-5
    assert max_diff(plain, weights(tmp_path / "both/dpo.pt")) < 1e-5
    assert max_diff(plain, weights(sft_ckpt)) > 1e-4  # and the steps did train


def test_max_prompt_len_and_skip_invalid_through_the_script(files, sft_ckpt, tmp_path,
                                                           capsys):
    bad = tmp_path / "pairs.jsonl"
    with open(files["pairs_train"], encoding="utf-8") as f:
        bad.write_text(f.read() + '{"prompt": "Q", "chosen": 5, "rejected": "b"}\n',
                       encoding="utf-8")
    args = dpo_args(files, tmp_path, sft_ckpt, "--steps", "1", "--batch-size", "4",
                    "--skip-invalid", "--max-prompt-len", "16", "--no-save")
    args[args.index("--data") + 1] = str(bad)
    train_dpo.main(args)
    out = capsys.readouterr().out
    assert "skipped 1 invalid records: 1 wrong type" in out
    short = float(out.split("pairs (")[1].split(" tokens")[0])
    train_dpo.main(dpo_args(files, tmp_path, sft_ckpt, "--steps", "1", "--batch-size", "4",
                            "--no-save"))
    assert short < float(capsys.readouterr().out.split("pairs (")[1].split(" tokens")[0])
    assert not os.path.exists(tmp_path / "dpo.pt")  # --no-save


def test_schedule_and_optimizer_flags_through_sft(files, tmp_path):
    # 256 conversations / 32 = 8 steps an epoch; --epochs 0.5 = 4 steps. The last one
    # (index 3, 2/3 of the way after 1 warm-up step) has lr 3e-3 * (0.5 + 0.5 * 0.5 *
    # (1 + cos(2 pi / 3))) = 1.875e-3 with --min-lr-ratio 0.5 (0.1 would give 1.425e-3).
    # --grad-clip 0 still logs the norm.
    train_sft.main(sft_args(files, tmp_path, "--epochs", "0.5", "--batch-size", "32",
                            "--warmup-steps", "1", "--min-lr-ratio", "0.5", "--grad-clip", "0",
                            "--weight-decay", "0", "--no-group-by-length", "--device", "cpu",
                            "--tokenizer", DEFAULT_TOKENIZER, "--preset", "tiny",
                            "--log-every", "1"))
    log = records(tmp_path / "sft/metrics.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert log[-1]["lr"] == pytest.approx(1.875e-3, rel=1e-6)
    assert all(r["grad_norm"] > 0 for r in log)


def test_compile_gives_the_eager_losses(files, tmp_path):
    common = ["--steps", "2", "--batch-size", "4", "--log-every", "1", "--val-data", ""]
    train_sft.main(sft_args(files, tmp_path / "eager", *common))
    run_script("train_sft.py", *sft_args(files, tmp_path / "compiled", *common, "--compile"),
               timeout=600)
    eager = records(tmp_path / "eager/sft/metrics.jsonl")
    compiled = records(tmp_path / "compiled/sft/metrics.jsonl")
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


def test_sample_flags(sft_ckpt, tmp_path):
    other = tmp_path / "other.pt"
    other.write_bytes(sft_ckpt.read_bytes())
    out = run_script("sample.py", "--ckpt", str(sft_ckpt), "--compare", str(other), "--n",
                     "2", "--max-new-tokens", "4", "--tokenizer", DEFAULT_TOKENIZER,
                     "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "1")
    assert out.count("sft.pt:") == out.count("other.pt:") == 2  # 2 prompts x 2 checkpoints
    out = run_script("sample.py", "--ckpt", str(sft_ckpt), "--system", "Be brief.",
                     "--prompt", "What is 7 + 5?", "--max-new-tokens", "4", "--device", "cpu")
    assert out.count("sft.pt:") == 1


def test_evaluate_on_your_own_prompt_file(sft_ckpt, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    with open(os.path.join(ROOT, "data", "eval_prompts.jsonl"), encoding="utf-8") as f:
        prompts.write_text("".join(f.readlines()[:3]), encoding="utf-8")
    out = run_script("evaluate.py", "--ckpt", str(sft_ckpt), "--prompts", str(prompts),
                     "--samples", "0", "--max-new-tokens", "4")
    assert "greedy on 3 held-out prompts" in out


def test_shape_flags_reach_the_model(files, tmp_path):
    train_sft.main(sft_args(files, tmp_path, "--steps", "1", "--batch-size", "4",
                            "--ffn-dim", "48", "--rope-theta", "10000", "--norm-eps", "1e-6",
                            "--qk-norm", "--n-experts", "3", "--experts-per-token", "1",
                            "--aux-loss-coef", "0.01"))
    ckpt = load_checkpoint(str(tmp_path / "sft.pt"))
    config = ckpt["config"]
    assert (config["dim"], config["n_layers"], config["ffn_dim"]) == (32, 2, 48)
    assert config["rope_theta"] == 10000 and config["norm_eps"] == 1e-6
    assert config["qk_norm"] and "layers.0.attn.q_norm.weight" in ckpt["model"]
    assert (config["n_experts"], config["experts_per_token"], config["aux_loss_coef"]) == (
        3, 1, 0.01) and "layers.1.ffn.experts.2.w2.weight" in ckpt["model"]
    assert SHAPE[SHAPE.index("--max-seq-len") + 1] == str(config["max_seq_len"])


def test_sweep_trains_evaluates_and_tabulates(files, sft_ckpt, tmp_path):
    """sweep.py end to end on a small scale: two rows (one sharing the reference cache,
    one reference-free), one evaluate.py call, the table; a second call reuses the runs."""
    args = ["--runs", "sigmoid", "simpo", "--sft-ckpt", str(sft_ckpt), "--out-dir",
            str(tmp_path), "--nproc", "1", "--samples", "1", "--limit", "12",
            "--train-flags", f"--data {files['pairs_train']} --val-data {files['pairs_val']} "
            "--steps 2 --batch-size 4"]
    out = run_script("sweep.py", *args, timeout=300)
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| sigmoid", "| simpo"]
    assert "`--loss simpo --beta 2.5 --simpo-gamma 1.25`" in rows[2]
    assert os.path.exists(tmp_path / "table.md")
    assert os.listdir(tmp_path / "sigmoid/dpo")  # the reference cache and metrics
    assert "beta: each run's --beta where it has one, else train_dpo.py's default" in out
    with open(tmp_path / "sigmoid/train.log", encoding="utf-8") as f:  # not TinyChat's file
        assert f.readline().startswith("beta 0.1 (the DPO paper's")
    again = run_script("sweep.py", *args, timeout=300)
    assert "[sigmoid]" not in again  # finished runs are not trained again


def test_sweep_list_and_retrain(files, sft_ckpt, tmp_path):
    listing = run_script("sweep.py", "--list")
    assert "simpo          --loss simpo --beta 2.5 --simpo-gamma 1.25" in listing
    assert "beta-0.1       --beta 0.1" in listing
    args = ["--runs", "sigmoid", "--sft-ckpt", str(sft_ckpt), "--out-dir", str(tmp_path),
            "--nproc", "1", "--samples", "1", "--limit", "6", "--train-flags",
            f"--data {files['pairs_train']} --val-data '' --steps 1 --batch-size 4"]
    run_script("sweep.py", *args, timeout=300)
    assert "[sigmoid]" in run_script("sweep.py", *args, "--retrain", timeout=300)


@pytest.mark.parametrize("flags, dtype, warned", [("fpu sse2 avx512f", "bfloat16", True),
                                                  ("fpu avx512f avx512_bf16", "bfloat16", False),
                                                  ("fpu sse2", "float32", False)])
def test_bf16_without_cpu_support_is_announced_at_start_up(files, sft_ckpt, tmp_path,
                                                           monkeypatch, capsys, flags, dtype,
                                                           warned):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(training, "CPUINFO", str(cpuinfo))
    train_dpo.main(dpo_args(files, tmp_path / "dpo", sft_ckpt, "--steps", "1", "--dtype", dtype,
                            "--no-save", "--val-data", ""))
    train_sft.main(sft_args(files, tmp_path / "sft", "--steps", "1", "--dtype", dtype,
                            "--no-save"))
    out = capsys.readouterr().out
    assert out.count("no bfloat16 instructions") == (2 if warned else 0)
