"""tools/iterate.py, on-policy DPO: the pairing rule, the round prompts kept off the
held-out set, rounds end to end through the script (train_dpo.py reading each round's
pair file), resuming, the same pairs from the same seed, and its one-line errors."""

import json
import os
import sys

import pytest
import torch

import data
import tasks
from conftest import run_concurrently
from tools import iterate
from tools.iterate import best_against_worst


def test_pairing_rule_on_hand_made_scores():
    assert best_against_worst([0.6, 1.0, 0.0, 1.0], 0.2) == (1, 2)  # first of the tied best
    assert best_against_worst([0.0, 0.8, 0.0], 0.2) == (1, 0)  # first of the tied worst
    assert best_against_worst([1.0, 1.0, 1.0], 0.2) is None  # all equal: no pair
    assert best_against_worst([0.8], 0.2) is None  # one answer
    assert best_against_worst([], 0.2) is None
    assert best_against_worst([0.8, 1.0], 0.2) == (1, 0)  # politeness/concision apart
    assert best_against_worst([0.8, 1.0], 0.6) is None  # a near-tie under a wider gap
    assert best_against_worst([0.0, 0.6], 0.6) == (1, 0)  # the gap itself is enough


def test_round_prompts_are_from_the_training_pool():
    """A round asks only training wordings and items: none of its questions (normalised)
    is an evaluation or validation question, none of its items unseen."""
    rounds = [iterate.round_prompts(3000, 0, r) for r in (1, 2)]
    held_out = set()
    for name in ("eval_prompts.jsonl", "sft_val.jsonl", "pairs_val.jsonl"):
        held_out |= tasks.source_summary(data_rows(name))[0]
    for rows in rounds:
        questions, items = tasks.source_summary(rows)
        assert not questions & held_out and not items & tasks.unseen_items()
        assert {r["meta"]["skill"] for r in rows} == set(tasks.SKILLS)
    assert rounds[0] != rounds[1]  # each round its own prompts
    assert iterate.round_prompts(50, 0, 1) == iterate.round_prompts(50, 0, 1)


def data_rows(name):
    return tasks.read_jsonl(os.path.join(data.DATA_DIR, name))


@pytest.fixture
def stand_in_judge(monkeypatch):
    """A 12-step SFT model's answers all score 0 under TinyChat's judge: this one scores
    them by their length, so that pairs form."""
    monkeypatch.setattr(tasks, "judge", lambda meta, text: {
        "score": (len(text) % 5) / 4, "correct": 1.0, "polite": 1.0, "concise": 1.0,
        "refused": 0.0})


def iterate_args(sft_ckpt, out, *extra):
    return ["--sft-ckpt", str(sft_ckpt), "--out-dir", str(out), "--rounds", "2",
            "--prompts", "6", "--k", "3", "--min-gap", "0.25", "--max-new-tokens", "12",
            "--nproc", "1", "--eval-samples", "1", "--eval-limit", "6", "--device", "cpu",
            "--lr", "1e-3", "--train-flags", "--steps 2 --batch-size 1 --warmup-steps 1 "
            "--val-data '' --quiet --seed 3", *extra]


def test_rounds_end_to_end_resume_and_same_seed(sft_ckpt, tmp_path, stand_in_judge, capsys):
    out = tmp_path / "a"
    iterate.main(iterate_args(sft_ckpt, out, "--reference", "sft"))
    printed = capsys.readouterr().out
    for r in (1, 2):
        record = json.loads((out / f"round{r}" / "round.json").read_text())
        pairs_path = out / f"round{r}" / "pairs.jsonl"
        pairs = [json.loads(line) for line in pairs_path.read_text().splitlines()]
        assert record["pairs"] == len(pairs) >= 1
        assert record["pairs"] + record["tied"] == 6
        assert all(p["scores"][0] - p["scores"][1] >= 0.25 for p in pairs)
        assert record["warmup_steps"] == 1  # --steps 2: 10% of it, at least 1
        # train_dpo.py read the round's pair file and trained its 2 steps from the policy
        metrics = [json.loads(line) for line in
                   (out / f"round{r}" / "dpo" / "metrics.jsonl").read_text().splitlines()]
        assert metrics[-1]["step"] == 2
        assert metrics[0]["lr"] == pytest.approx(1e-3)  # --lr reached train_dpo.py
        assert record["policy_in"] == (str(sft_ckpt) if r == 1 else
                                       str(out / "round1" / "dpo.pt"))
        assert record["reference"] == str(sft_ckpt)  # --reference sft
        assert set(record["eval"]) >= {"sampled T=1/score", "sampled T=1/kl_vs_ref",
                                       "sampled T=1/win_rate_vs_first"}
    results = json.loads((out / "results.json").read_text())["results"]
    assert list(results) == [str(sft_ckpt), str(out / "round1" / "dpo.pt"),
                             str(out / "round2" / "dpo.pt")]
    assert "| round 2 |" in (out / "table.md").read_text() and "| round 2 |" in printed

    # run again: both rounds are done, nothing is sampled or trained again
    before = os.path.getmtime(out / "round2" / "dpo.pt")
    iterate.main(iterate_args(sft_ckpt, out, "--reference", "sft"))
    assert capsys.readouterr().out.count("done already") == 2
    assert os.path.getmtime(out / "round2" / "dpo.pt") == before

    # the same seed elsewhere: the same pairs, round after round; another seed: others
    iterate.main(iterate_args(sft_ckpt, tmp_path / "b", "--reference", "sft"))
    for r in (1, 2):
        assert ((tmp_path / "b" / f"round{r}" / "pairs.jsonl").read_bytes()
                == (out / f"round{r}" / "pairs.jsonl").read_bytes())
    # another seed, from another policy with --start (e.g. offline DPO's), in one run: the
    # other seed's prompts, judged as the "start" row; --reference previous (the default):
    # round 1's reference is its own starting policy
    start = str(out / "round2" / "dpo.pt")
    iterate.main(iterate_args(sft_ckpt, tmp_path / "c", "--rounds", "1", "--seed", "1",
                              "--start", start))
    asked = [row["messages"] for row in iterate.round_prompts(6, 1, 1)]
    assert asked != [row["messages"] for row in iterate.round_prompts(6, 0, 1)]
    pairs = [json.loads(line) for line in
             (tmp_path / "c" / "round1" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(pair["prompt"] in asked for pair in pairs)
    record = json.loads((tmp_path / "c" / "round1" / "round.json").read_text())
    assert record["policy_in"] == record["reference"] == start
    assert list(json.loads((tmp_path / "c" / "results.json").read_text())["results"]) == [
        str(sft_ckpt), start, str(tmp_path / "c" / "round1" / "dpo.pt")]
    assert "| start |" in (tmp_path / "c" / "table.md").read_text()


def test_a_round_is_refused_under_other_settings_and_judged_again_under_others(
        sft_ckpt, tmp_path, stand_in_judge, capsys):
    """A round made with --eval-samples 0: asked again with another --k, refused; then asked
    for an evaluation, judged (no KeyError); another --eval-limit: judged again, the table's
    SFT row and round rows from the same prompts, nothing trained again; from a retrained
    SFT model at the same path: refused, not mixed with the old round."""
    sft = tmp_path / "sft.pt"
    sft.write_bytes(sft_ckpt.read_bytes())
    out = tmp_path / "a"
    iterate.main(iterate_args(sft, out, "--rounds", "1", "--eval-samples", "0"))
    with pytest.raises(ValueError, match=r"made with other settings \(k\)"):
        iterate.main(iterate_args(sft, out, "--rounds", "1", "--eval-samples", "0",
                                  "--k", "4"))
    record_path = out / "round1" / "round.json"
    assert "eval" not in json.loads(record_path.read_text())
    trained = os.path.getmtime(out / "round1" / "dpo.pt")
    iterate.main(iterate_args(sft, out, "--rounds", "1"))
    record = json.loads(record_path.read_text())
    assert record["eval_settings"]["eval_limit"] == 6 and "sampled T=1/score" in record["eval"]
    capsys.readouterr()
    iterate.main(iterate_args(sft, out, "--rounds", "1", "--eval-limit", "12",
                              "--eval-split", "test"))
    assert "judged again" in capsys.readouterr().out
    record = json.loads(record_path.read_text())
    assert record["eval_settings"] == {"eval_samples": 1, "eval_limit": 12,
                                       "eval_split": "test"}
    assert os.path.getmtime(out / "round1" / "dpo.pt") == trained  # not trained again
    ckpt = torch.load(sft, weights_only=True)
    ckpt["model"]["norm.weight"] += 1
    torch.save(ckpt, sft)
    with pytest.raises(ValueError, match=r"other settings \(sft_sha256, start_sha256\)"):
        iterate.main(iterate_args(sft, out, "--rounds", "1", "--eval-samples", "0"))


def test_errors_are_one_line(sft_ckpt, tmp_path):
    """`python -m tools.iterate` with a bad flag, a missing checkpoint, and a round in which
    no pair forms (three runs, two at a time: conftest.run_concurrently)."""
    script = [sys.executable, "-m", "tools.iterate"]
    gap, missing, tied = run_concurrently([
        [*script, "--min-gap", "0"], [*script, "--sft-ckpt", str(tmp_path / "none.pt")],
        # TinyChat's own judge gives a 12-step model's answers 0 each: every prompt ties
        [*script, *iterate_args(sft_ckpt, tmp_path / "t", "--rounds", "1")]])
    assert gap.returncode == 2 and gap.stderr.count("\n") == 1
    assert "--min-gap must be above 0" in gap.stderr
    assert missing.returncode == 1 and missing.stderr.startswith("error: no checkpoint at")
    assert tied.returncode == 1, tied.stderr
    assert tied.stderr.strip().splitlines()[-1].startswith("error: round 1: all 6 prompts")
    assert "Traceback" not in tied.stderr
