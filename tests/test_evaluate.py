"""evaluate.py end to end on tiny checkpoints, and its statistics on known cases."""

import json
import os

import pytest
import torch

import data
import tokenizer
import evaluate
from conftest import ROOT, in_process
from checkpoint import save_checkpoint
from model import Transformer, make_config


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = Transformer(make_config("tiny", vocab_size=1536, dim=32, n_layers=1,
                                        n_heads=4, n_kv_heads=2))
        paths.append(str(d / f"m{seed}.pt"))
        save_checkpoint(paths[-1], model, tokenizer.tokenizer_identity())
    return paths


def run_evaluate(*args):
    """evaluate.py with these flags (in this process, conftest.in_process); what it printed."""
    out = in_process(evaluate.main, *args)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_report_runs_and_a_checkpoint_against_itself_ties(checkpoints, tmp_path):
    a, b = checkpoints
    report = str(tmp_path / "self.json")
    stdout = run_evaluate("--ckpt", a, "--ckpt", b, "--limit", "12", "--samples", "2",
                          "--max-new-tokens", "6", "--json", report)
    assert "win_rate_vs_first" in stdout and "score/harmful" in stdout
    with open(report) as f:
        results = json.load(f)["results"]
    assert set(results) == {a, b}
    same = str(tmp_path / "same.json")  # one checkpoint twice: every sample ties
    run_evaluate("--ckpt", a, "--ckpt", a, "--limit", "12", "--samples", "2",
                 "--max-new-tokens", "6", "--json", same)
    with open(same) as f:
        assert json.load(f)["results"][a]["sampled T=1/win_rate_vs_first"] == 0.5
    assert results[a]["sampled T=1/kl_vs_ref"] == 0.0  # the reference itself
    assert results[b]["sampled T=1/kl_vs_ref"] != 0.0
    # the same checkpoint twice: every sample ties, and its KL from itself is 0
    rows = evaluate.eval_prompts()[::45]
    model = evaluate.load_model(a, tokenizer.DEFAULT_TOKENIZER, "cpu")
    enc = tokenizer.load_tokenizer()
    prompts, answers = evaluate.generate_all(model, enc, rows, 3, 1.0, 6, 0, "cpu")
    prompts2, answers2 = evaluate.generate_all(model, enc, rows, 3, 1.0, 6, 0, "cpu")
    assert answers == answers2  # deterministic given the seed
    scored = evaluate.score_answers(enc, rows, answers, data.Chat(enc).im_end)
    assert evaluate.win_rate(scored, scored) == 0.5
    logps = evaluate.answer_logps(model, prompts, answers, "cpu")
    kl, se = evaluate.kl_estimate(logps, logps)
    assert kl == 0.0 and se == 0.0


def test_preference_accuracy_of_the_reference_against_itself_is_zero(checkpoints, tmp_path):
    a, b = checkpoints
    pairs = tmp_path / "pairs.jsonl"
    with open(os.path.join(ROOT, "data", "pairs_val.jsonl"), encoding="utf-8") as f:
        pairs.write_text("".join(next(f) for _ in range(24)), encoding="utf-8")
    report = str(tmp_path / "pairs.json")
    run_evaluate("--ckpt", a, "--ckpt", b, "--ref", a, "--pairs", str(pairs), "--json", report)
    with open(report) as f:
        results = json.load(f)["results"]
    assert (results[a]["pairs/accuracy"], results[a]["pairs/margin"]) == (0.0, 0.0)  # strict >
    assert results[b]["pairs/margin"] != 0.0


def test_win_rate_counts_ties_as_half():
    def s(x):
        return {"score": x}, 1

    a = [[s(1.0), s(0.0)], [s(0.5), s(0.8)]]
    b = [[s(1.0), s(1.0)], [s(0.0), s(0.8)]]
    assert evaluate.win_rate(a, b) == (0.5 + 1 + 0 + 0.5) / 4
    # KL per answer: the mean over samples; its standard error by prompt (means 2 and 6)
    assert evaluate.kl_estimate([[1.0, 3.0], [5.0, 7.0]], [[0.0, 0.0], [0.0, 0.0]]) == (
        pytest.approx(4.0), pytest.approx(2.0))


def test_scores_are_summarised_per_set_with_standard_errors_by_prompt():
    """Two prompts of the seen set, one of the unseen: the means per set, and the standard
    error of the mean score over prompts (each prompt's samples averaged first)."""
    def s(score, refused=0.0):
        return {"score": score, "polite": 1.0, "refused": refused}, 5

    rows = [{"meta": {"skill": "harmful"}, "set": "seen"},
            {"meta": {"skill": "arithmetic"}, "set": "seen"},
            {"meta": {"skill": "harmful"}, "set": "unseen"}]
    scored = [[s(1.0, 1.0), s(0.0)], [s(1.0), s(1.0)], [s(0.0), s(0.0)]]
    out = evaluate.summarize(rows, scored)
    assert out["score"] == pytest.approx(0.5) and out["seen/score"] == pytest.approx(0.75)
    assert out["unseen/score"] == 0.0 and out["seen/score/arithmetic"] == 1.0
    assert out["refusal/harmful"] == 0.25 and out["seen/refusal/harmful"] == 0.5
    # prompt means 0.5, 1.0, 0.0: sd 0.5, over sqrt(3) prompts
    assert out["score_se"] == pytest.approx(0.5 / 3 ** 0.5)
    assert "unseen/score/arithmetic" not in out  # no such prompt


def test_the_split_flag_picks_the_evaluation_half(checkpoints, tmp_path):
    """--split dev and --split test judge disjoint halves of the shipped prompts."""
    a, _ = checkpoints
    asked = {}
    for split in ("dev", "test"):
        report = str(tmp_path / f"{split}.json")
        stdout = run_evaluate("--ckpt", a, "--split", split, "--limit", "8", "--samples", "0",
                              "--max-new-tokens", "2", "--json", report)
        assert f"({split} split)" in stdout
        with open(report) as f:
            assert json.load(f)["args"]["split"] == split
        rows = [r for r in evaluate.eval_prompts() if r["split"] == split]
        asked[split] = {r["messages"][-1]["content"] for r in rows}
    assert not asked["dev"] & asked["test"] and len(asked["dev"]) == len(asked["test"]) == 352


def test_pair_file_report_measures_where_log_probs_moved(checkpoints, tmp_path, write_file):
    """--pairs: accuracy, margin, and the per-token log-prob shifts from the reference; a
    checkpoint against itself has every shift exactly 0; TinyChat's `flaw` field splits
    the per-answer sums. A hand-made pair shares the prefix "Paris" and then differs."""
    a, b = checkpoints
    pairs = write_file("pairs.jsonl", [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Paris, you fool.",
         "flaw": "rude"},
        {"prompt": "2+2?", "chosen": "4.", "rejected": "5.", "flaw": "wrong"}])
    report = str(tmp_path / "pairs.json")
    run_evaluate("--ckpt", a, "--ckpt", b, "--ref", a, "--pairs", pairs, "--json", report)
    with open(report) as f:
        results = json.load(f)["results"]
    assert all(v == 0.0 for k, v in results[a].items() if k.startswith("shift/"))
    assert {"shift/chosen/shared_prefix", "shift/chosen/after_divergence",
            "shift/rejected/sum/rude", "shift/rejected/sum/wrong"} <= set(results[b])
    assert results[b]["shift/chosen/shared_prefix"] != 0.0
    # p_end: the policy's probability of each chosen answer's last token (<|im_end|>)
    model = evaluate.load_model(b, tokenizer.DEFAULT_TOKENIZER, "cpu")
    dataset = data.PreferenceDataset(pairs, tokenizer.load_tokenizer(), 256, 128)
    items = [dataset[i] for i in range(len(dataset))]
    ends = []
    for item in items:
        ids = torch.tensor([item["prompt"] + item["chosen"]])
        with torch.no_grad():
            log_probs = model(ids[:, :-1]).log_softmax(-1)[0, -1]  # predicts the last token
        ends.append(log_probs[ids[0, -1]].exp().item())
    assert items[0]["chosen"][-1] == data.Chat(tokenizer.load_tokenizer()).im_end
    assert results[b]["p_end/chosen"] == pytest.approx(sum(ends) / len(ends), rel=1e-5)
    # --json keeps each checkpoint's per-token shifts of the pairs (one per flaw type), for
    # tools/plot.py tokens: the tokens as text, the first differing token, and shifts
    # that sum to the change of the answer's log-prob, computed here by a full forward
    with open(report) as f:
        shown = json.load(f)["token_shifts"][b]
    assert [p["group"] for p in shown] == ["rude", "wrong"]
    assert [p["question"] for p in shown] == ["Capital of France?", "2+2?"]
    assert "".join(shown[0]["chosen"]) == "Paris.<|im_end|>"
    assert "".join(shown[0]["rejected"]) == "Paris, you fool.<|im_end|>"
    assert "".join(shown[0]["chosen"][:shown[0]["diverge"]]) == "Paris"
    assert shown[1]["diverge"] == 0
    one = str(tmp_path / "one.json")  # --token-shifts N: that many pairs
    run_evaluate("--ckpt", b, "--ref", a, "--pairs", pairs, "--json", one, "--token-shifts", "1")
    with open(one) as f:
        assert [p["group"] for p in json.load(f)["token_shifts"][b]] == ["rude"]
    reference = evaluate.load_model(a, tokenizer.DEFAULT_TOKENIZER, "cpu")
    for pair, item in zip(shown, items):
        for side in ("chosen", "rejected"):
            ids = torch.tensor([item["prompt"] + item[side]])
            change = 0.0
            for m, sign in ((model, 1), (reference, -1)):
                with torch.no_grad():
                    log_probs = m(ids[:, :-1]).log_softmax(-1)[0]  # (T-1, V)
                n = len(item[side])
                change += sign * log_probs[-n:].gather(-1, ids[0, -n:, None]).sum().item()
            assert len(pair[f"{side}_shift"]) == len(item[side])
            assert sum(pair[f"{side}_shift"]) == pytest.approx(change, abs=1e-4)
