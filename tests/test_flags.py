"""Every command-line flag, passed the way a user passes it, with its effect checked where
a number can show it (the loss of each --loss at step 0, the schedule's last lr, ...)."""

import json
import math
import os

import pytest
import torch

import data
import devices
import evaluate
import sample
import train_dpo
import train_sft
from conftest import (ROOT, SHAPE, command, dpo_args, in_process, max_diff, run_concurrently,
                      sft_args, weights)
from checkpoint import load_checkpoint
from tokenizer import DEFAULT_TOKENIZER
from tools import sweep


def records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def run_sweep(*args):
    """`python -m tools.sweep ARGS` in this process (conftest.in_process; it runs as a
    process in test_errors.py); what it printed. Its runs are processes of their own."""
    result = in_process(sweep.main, *args)
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


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


# Each loss at policy != reference, from one pair's logged numbers: r_w, r_l (the rewards
# over beta), the summed log-probs and the token counts n_w, n_l. The flags' values:
# beta 0.5, eps 0.2, lambda 5, alpha 0.05, gamma 0.3.
B, EPS = 0.5, 0.2
AWAY_FROM_ZERO = {
    "sigmoid": ([], lambda r_w, r_l, lw, ll, n_w, n_l: -log_sigmoid(B * (r_w - r_l))),
    "conservative": (["--label-smoothing", str(EPS)], lambda r_w, r_l, lw, ll, n_w, n_l: (
        -(1 - EPS) * log_sigmoid(B * (r_w - r_l)) - EPS * log_sigmoid(-B * (r_w - r_l)))),
    "robust": (["--loss", "robust", "--label-smoothing", str(EPS)],
               lambda r_w, r_l, lw, ll, n_w, n_l: (
                   -(1 - EPS) * log_sigmoid(B * (r_w - r_l))
                   + EPS * log_sigmoid(-B * (r_w - r_l))) / (1 - 2 * EPS)),
    "norm": (["--loss", "norm"], lambda r_w, r_l, lw, ll, n_w, n_l: -log_sigmoid(
        B * (r_w / n_w - r_l / n_l))),
    "dpop": (["--loss", "dpop", "--dpop-lambda", "5"], lambda r_w, r_l, lw, ll, n_w, n_l:
             -log_sigmoid(B * (r_w - r_l - 5 * max(0.0, -r_w)))),
    "rdpo": (["--loss", "rdpo", "--rdpo-alpha", "0.05"], lambda r_w, r_l, lw, ll, n_w, n_l:
             -log_sigmoid(B * (r_w - r_l) + 0.05 * (n_w - n_l))),
    "simpo": (["--loss", "simpo", "--simpo-gamma", "0.3", "--label-smoothing", str(EPS)],
              lambda r_w, r_l, lw, ll, n_w, n_l: (
                  -(1 - EPS) * log_sigmoid(B * (lw / n_w - ll / n_l) - 0.3)
                  - EPS * log_sigmoid(-(B * (lw / n_w - ll / n_l) - 0.3)))),
    "orpo": (["--loss", "orpo"], lambda r_w, r_l, lw, ll, n_w, n_l: (
        -lw / n_w - B * log_sigmoid(
            (lw / n_w - math.log(-math.expm1(lw / n_w)))
            - (ll / n_l - math.log(-math.expm1(ll / n_l)))))),
}


@pytest.mark.parametrize("name", sorted(AWAY_FROM_ZERO))
def test_each_loss_flag_gives_its_formula_away_from_step_zero(files, sft_ckpt, tmp_path,
                                                             enc, name):
    """At step 0 policy = reference, where five of these give ln 2: a flag that never
    reached dpo_loss would pass there. One pair a step (--batch-size 1), so every logged
    record is one pair's numbers; steps 2.. have policy != reference."""
    flags, formula = AWAY_FROM_ZERO[name]
    train_dpo.main(dpo_args(files, tmp_path, sft_ckpt, "--steps", "6", "--batch-size", "1",
                            "--beta", str(B), "--log-every", "1", "--lr", "3e-3", *flags))
    ds = data.PreferenceDataset(files["pairs_train"], enc, 256, 128, log=None)
    order = data.BatchOrder(ds.lengths(), 1, 3, group_by_length=True)  # as train_dpo.py
    log = records(tmp_path / "dpo/metrics.jsonl")[1:]
    for r in log:
        item = ds[order(r["step"] - 1)[0][0]]
        n_w, n_l = sum(item["chosen_mask"]), sum(item["rejected_mask"])
        lw, ll = r["logps/chosen"], r["logps/rejected"]
        if name in ("simpo", "orpo"):  # their rewards: beta * the averaged log-probs
            assert r["rewards/chosen"] == pytest.approx(B * lw / n_w, rel=1e-5)
        r_w, r_l = r["rewards/chosen"] / B, r["rewards/rejected"] / B
        assert r["loss"] == pytest.approx(formula(r_w, r_l, lw, ll, n_w, n_l), rel=1e-4,
                                          abs=1e-6), r
    assert any(abs(r["rewards/margins"]) > 1e-3 for r in log)  # away from h = 0
    if name == "dpop":  # the penalty was active somewhere, and that is not plain DPO
        assert any(r["rewards/chosen"] < 0 for r in log)
    if name == "rdpo":  # length entered: chosen and rejected differ in length
        assert any(sum(ds[order(r["step"] - 1)[0][0]]["chosen_mask"])
                   != sum(ds[order(r["step"] - 1)[0][0]]["rejected_mask"]) for r in log)


def test_sft_alpha_adds_the_chosen_nll(files, sft_ckpt, tmp_path):
    """RPO through the script: the logged loss is loss/dpo + alpha * loss/nll + loss/aux,
    and alpha changes the training."""
    common = ["--steps", "3", "--batch-size", "4", "--log-every", "1"]
    train_dpo.main(dpo_args(files, tmp_path / "rpo", sft_ckpt, *common, "--sft-alpha", "0.5"))
    train_dpo.main(dpo_args(files, tmp_path / "dpo", sft_ckpt, *common))
    for r in records(tmp_path / "rpo/dpo/metrics.jsonl"):
        assert r["loss/nll"] > 0
        assert r["loss"] == pytest.approx(r["loss/dpo"] + 0.5 * r["loss/nll"] + r["loss/aux"],
                                          rel=1e-6)
    for r in records(tmp_path / "dpo/dpo/metrics.jsonl"):
        assert r["loss"] == pytest.approx(r["loss/dpo"], rel=1e-6)
    assert max_diff(weights(tmp_path / "rpo/dpo.pt"), weights(tmp_path / "dpo/dpo.pt")) > 0


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


def test_ref_ckpt_is_the_reference(files, sft_ckpt, tmp_path, capsys):
    """--ref-ckpt P: step 0's rewards are beta (log pi - log pi_P), so swapping policy and
    reference flips their sign; naming the SFT model itself changes nothing; a precomputed
    reference of P is cached under its own key."""
    common = ["--steps", "2", "--batch-size", "4", "--log-every", "1"]
    train_dpo.main(dpo_args(files, tmp_path / "p", sft_ckpt, *common))
    moved = tmp_path / "p/dpo.pt"
    train_dpo.main(dpo_args(files, tmp_path / "a", sft_ckpt, *common, "--ref-ckpt", str(moved)))
    train_dpo.main(dpo_args(files, tmp_path / "b", moved, *common, "--ref-ckpt", str(sft_ckpt)))
    a = records(tmp_path / "a/dpo/metrics.jsonl")[0]
    b = records(tmp_path / "b/dpo/metrics.jsonl")[0]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(a[key]) > 1e-4
        assert a[key] == pytest.approx(-b[key], rel=1e-4, abs=1e-6)
    train_dpo.main(dpo_args(files, tmp_path / "c", sft_ckpt, *common, "--ref-ckpt",
                            str(sft_ckpt)))
    assert max_diff(weights(tmp_path / "p/dpo.pt"), weights(tmp_path / "c/dpo.pt")) == 0
    out = tmp_path / "cache"
    train_dpo.main(dpo_args(files, out, sft_ckpt, *common, "--precompute-ref"))
    train_dpo.main(dpo_args(files, out, sft_ckpt, *common, "--precompute-ref", "--ref-ckpt",
                            str(moved)))
    assert len(list((out / "dpo").glob("ref_logps_*.pt"))) == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        train_dpo.main(dpo_args(files, out, sft_ckpt, "--ref-ckpt", str(moved),
                                "--reference-free"))
    assert exit_.value.code == 2 and "--ref-ckpt names a reference" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--precompute-ref"], ["--reference-free"],
                                 ["--loss", "simpo"]])
def test_trdpo_is_refused_without_a_reference_model(files, sft_ckpt, tmp_path, bad, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_dpo.main(dpo_args(files, tmp_path, sft_ckpt, "--sync-ref-every", "2", *bad))
    assert exit_.value.code == 2
    assert "--sync-ref-every moves the reference during training: it needs a reference " \
        "model" in capsys.readouterr().err


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
    assert max(r["grad_norm"] for r in log) > 0.2  # so clipping at 0.2 acts
    # Each of the three flags alone changes the weights from a run with clip 0.2, decay
    # 0.1 and length-grouped batches, and --grad-clip 0 (no clipping) still trains
    flags = {"--grad-clip": ["--grad-clip", "0"], "--weight-decay": ["--weight-decay", "0"],
             "--no-group-by-length": ["--no-group-by-length"]}
    common = ["--steps", "4", "--batch-size", "32", "--warmup-steps", "1", "--grad-clip",
              "0.2"]
    train_sft.main(sft_args(files, tmp_path / "defaults", *common))
    train_sft.main(sft_args(files, tmp_path / "still", *common, "--lr", "0"))
    base = weights(tmp_path / "defaults/sft.pt")
    for name, flag in flags.items():
        train_sft.main(sft_args(files, tmp_path / name, *common, *flag))
        moved = weights(tmp_path / name / "sft.pt")
        assert max_diff(moved, base) > 1e-6, name
        assert max_diff(moved, weights(tmp_path / "still/sft.pt")) > 1e-4, name


def test_compile_gives_the_eager_losses(files, sft_ckpt, tmp_path):
    """--compile through the scripts, on the CPU: SFT, and DPO on the packed layout (a
    PackedPairs batch, the head at flat indices), each with the losses of its eager run.
    The two compiled runs go side by side (compiling is mostly one core's work); the GPU
    tier counts the graphs on CUDA."""
    sft = ["--steps", "2", "--batch-size", "4", "--log-every", "1", "--val-data", ""]
    dpo = ["--steps", "3", "--batch-size", "4", "--log-every", "1", "--val-data", "",
           "--packed"]
    compiled = run_concurrently([
        [*command("train_sft.py"), *sft_args(files, tmp_path / "sft", *sft, "--compile")],
        [*command("train_dpo.py"), *dpo_args(files, tmp_path / "dpo", sft_ckpt, *dpo,
                                             "--compile")]], timeout=600)
    assert all(r.returncode == 0 for r in compiled), [r.stderr[-2000:] for r in compiled]
    train_sft.main(sft_args(files, tmp_path / "eager_sft", *sft))
    train_dpo.main(dpo_args(files, tmp_path / "eager_dpo", sft_ckpt, *dpo))
    for stage, steps in (("sft", 2), ("dpo", 3)):
        eager = records(tmp_path / f"eager_{stage}/{stage}/metrics.jsonl")
        compiled = records(tmp_path / f"{stage}/{stage}/metrics.jsonl")
        assert len(eager) == len(compiled) == steps
        for a, b in zip(eager, compiled):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), stage


def test_sample_flags(sft_ckpt, tmp_path):
    other = tmp_path / "other.pt"
    other.write_bytes(sft_ckpt.read_bytes())
    compare = in_process(sample.main, "--ckpt", sft_ckpt, "--compare", other, "--n", "2",
                         "--max-new-tokens", "4", "--tokenizer", DEFAULT_TOKENIZER,
                         "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "1")
    one = in_process(sample.main, "--ckpt", sft_ckpt, "--system", "Be brief.", "--prompt",
                     "What is 7 + 5?", "--max-new-tokens", "4", "--device", "cpu")
    assert compare.returncode == one.returncode == 0, compare.stderr + one.stderr
    # 2 prompts x 2 checkpoints
    assert compare.stdout.count("sft.pt:") == compare.stdout.count("other.pt:") == 2
    assert one.stdout.count("sft.pt:") == 1


def test_sample_flags_reach_the_sampler(tmp_path, capsys):
    """Each flag changes what is generated the way it should: top-k 1 and a tiny top-p are
    greedy whatever the temperature; the seed picks the sample; --system enters the
    prompt (the script's answer is the one generated after that system message). On a
    random model, whose answers are long and varied. Through sample.py's main (its
    argument parser, the whole script but the interpreter's start; the script itself runs
    in test_train.py's torchrun test and test_errors.py's)."""
    import tokenizer
    from checkpoint import save_checkpoint
    from model import Transformer, make_config
    torch.manual_seed(0)
    ckpt, model = tmp_path / "random.pt", Transformer(make_config(
        "tiny", vocab_size=1536, dim=32, n_layers=2, n_heads=4, n_kv_heads=2))
    with torch.no_grad():  # weights 25x init's: logits far from uniform, set by the prompt
        for p in model.parameters():
            p.mul_(25)
    save_checkpoint(str(ckpt), model, tokenizer.tokenizer_identity())

    runs = [[], ["--temperature", "20", "--seed", "5"], ["--temperature", "20", "--seed", "5"],
            ["--temperature", "20", "--seed", "6"],
            ["--temperature", "20", "--top-k", "1", "--seed", "5"],
            ["--temperature", "20", "--top-p", "1e-9", "--seed", "5"],
            ["--system", "You answer in French."]]
    answers = []
    for flags in runs:
        sample.main(["--ckpt", str(ckpt), "--prompt", "What is 7 + 5?", "--max-new-tokens",
                     "12", *flags])
        answers.append(capsys.readouterr().out.split("random.pt: ", 1)[1][:-1])  # less \n
    greedy, *hot, top_k, top_p, french = answers
    assert hot[0] == hot[1] != hot[2] and greedy not in hot
    assert top_k == greedy and top_p == greedy
    model = sample.load_model(str(ckpt), DEFAULT_TOKENIZER, "cpu")
    system = [{"role": "system", "content": "You answer in French."}]
    user = [{"role": "user", "content": "What is 7 + 5?"}]
    expected = sample.reply(model, tokenizer.load_tokenizer(), system + user, 12)[0]
    assert expected != greedy
    assert french == expected


def test_evaluate_on_your_own_prompt_file(sft_ckpt, tmp_path):
    """A file of your own (no dev / test split in it): every prompt is judged. One whose
    rows all name another split than --split asks is one line saying so."""
    rows = [json.loads(line) for line in
            open(os.path.join(ROOT, "data", "eval_prompts.jsonl"), encoding="utf-8")][:3]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": r["messages"], "meta": r["meta"]}) + "\n"
                               for r in rows), encoding="utf-8")
    out = in_process(evaluate.main, "--ckpt", sft_ckpt, "--prompts", prompts, "--samples", "0",
                     "--max-new-tokens", "4")
    assert out.returncode == 0 and "greedy on 3 held-out prompts" in out.stdout, out.stderr
    dev_only = tmp_path / "dev.jsonl"  # the shipped file's first rows: all of the dev split
    dev_only.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = in_process(evaluate.main, "--ckpt", sft_ckpt, "--prompts", dev_only, "--samples",
                        "0")
    assert result.returncode == 1 and result.stderr == (
        f"error: {dev_only}: no prompt of the test split (its rows: dev); use --split dev or "
        "--split all\n")


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


def test_sweep_trains_evaluates_and_tabulates(files, sft_ckpt, tmp_path, monkeypatch):
    """sweep.py end to end on a small scale: three rows (two sharing one reference cache,
    one reference-free), one evaluate.py call, the table; a second call reuses the runs
    and their evaluation; --retrain trains a row again, and so does a new SFT model."""
    listing = run_sweep("--list")
    assert "simpo          --loss simpo --beta 2.5 --simpo-gamma 1.25" in listing
    assert "beta-0.1       --beta 0.1" in listing
    sft = tmp_path / "sft.pt"
    sft.write_bytes(sft_ckpt.read_bytes())
    args = ["--runs", "sigmoid", "rdpo", "simpo", "--sft-ckpt", str(sft), "--out-dir",
            str(tmp_path / "sweep"), "--nproc", "1", "--samples", "1", "--limit", "6",
            "--train-flags", f"--data {files['pairs_train']} --val-data {files['pairs_val']} "
            "--steps 2 --batch-size 4"]
    out = run_sweep(*args)
    tmp_path = tmp_path / "sweep"
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| sigmoid", "| rdpo", "| simpo"]
    assert "`--loss simpo --beta 2.5 --simpo-gamma 1.25`" in rows[3]
    assert os.path.exists(tmp_path / "table_dev.md")  # --split dev, the default
    assert os.listdir(tmp_path / "sigmoid/dpo")  # the reference cache and metrics
    for name, said in (("sigmoid", "computed"), ("rdpo", "loaded")):  # one cache, shared
        with open(tmp_path / name / "train.log", encoding="utf-8") as f:
            assert f"reference log-probs: {said}" in f.read(), name
    assert "beta: each run's --beta where it has one, else train_dpo.py's default" in out
    with open(tmp_path / "sigmoid/train.log", encoding="utf-8") as f:  # not TinyChat's file
        assert f.readline().startswith("beta 0.1 (the DPO paper's")
    again = run_sweep(*args)
    assert "[sigmoid]" not in again  # finished runs are not trained again, nor judged
    assert "evaluated already" in again
    assert [line for line in again.splitlines() if line.startswith("| ")] == rows
    one_row = [*args[:2], *args[4:]]  # one of the rows is enough to see it trained again
    started = []  # --retrain starts the finished run again (its process only noted here)
    with monkeypatch.context() as m:
        m.setattr(sweep, "run_logged", lambda cmd, log_path: started.append(cmd))
        assert "[sigmoid]" in run_sweep(*one_row, "--retrain")
    assert [cmd[cmd.index("--out-dir") + 1] for cmd in started if "--sft-ckpt" in cmd] == [
        str(tmp_path / "sigmoid")]
    train_sft.main(sft_args(files, sft.parent / "retrained", "--steps", "2", "--batch-size",
                            "4", "--seed", "9"))
    sft.write_bytes((sft.parent / "retrained/sft.pt").read_bytes())  # a new SFT model
    third = run_sweep(*one_row)  # trained again, not mixed into the old table
    assert "[sigmoid]" in third and "evaluating 1 runs and the SFT model" in third


@pytest.mark.parametrize("flags, dtype", [("fpu avx512f avx512_bf16", "bfloat16"),
                                          ("fpu amx_tile amx_bf16", "bfloat16"),
                                          ("fpu sse2 avx512f", "float32")])
def test_dtype_auto_takes_bf16_where_the_cpu_has_it(files, tmp_path, monkeypatch, capsys,
                                                     flags, dtype):
    """--dtype auto, the default: bfloat16 on a CPU with bf16 instructions (said in one
    line), float32 on one without; the run records the dtype it used. On a GPU float32."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(devices, "CPUINFO", str(cpuinfo))
    train_sft.main(sft_args(files, tmp_path, "--steps", "1", "--dtype", "auto"))
    said = capsys.readouterr().out.count("dtype bfloat16 (--dtype auto: this CPU multiplies")
    assert said == (dtype == "bfloat16")
    assert load_checkpoint(str(tmp_path / "sft.pt"))["train_state"]["args"]["dtype"] == dtype
    assert devices.auto_dtype("cuda") == devices.auto_dtype("cuda:1") == "float32"


@pytest.mark.parametrize("flags, dtype, warned", [("fpu sse2 avx512f", "bfloat16", True),
                                                  ("fpu avx512f avx512_bf16", "bfloat16", False),
                                                  ("fpu sse2", "float32", False)])
def test_bf16_without_cpu_support_is_announced_at_start_up(files, sft_ckpt, tmp_path,
                                                           monkeypatch, capsys, flags, dtype,
                                                           warned):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(devices, "CPUINFO", str(cpuinfo))
    train_dpo.main(dpo_args(files, tmp_path / "dpo", sft_ckpt, "--steps", "1", "--dtype", dtype,
                            "--no-save", "--val-data", ""))
    train_sft.main(sft_args(files, tmp_path / "sft", "--steps", "1", "--dtype", dtype,
                            "--no-save"))
    out = capsys.readouterr().out
    assert out.count("no bfloat16 instructions") == (2 if warned else 0)
