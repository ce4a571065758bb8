"""On-policy DPO: sample the policy, judge its answers, pair best against worst, train DPO
on those pairs, round after round; each round measured on the held-out prompts.

    python -m tools.iterate                                # 3 rounds from out/sft.pt
    python -m tools.iterate --start out/dpo.pt --out-dir out/offline_then_onpolicy
    python -m tools.iterate --rounds 4 --k 8 --prompts 1000 --reference sft

Each round r:
  1. N fresh TinyChat prompts from tasks.py's own generators, seeded by (--seed, r), from
     its training pool: training wordings and items only, so no round asks what the
     evaluation or validation prompts ask (`python tasks.py --check --rounds OUT` shows it);
  2. k answers to each from the current policy (temperature T, KV cache, batched);
  3. TinyChat's judge scores every answer; a prompt gives one pair, its best answer
     against its worst, when their scores differ by at least --min-gap (a prompt whose
     answers all tie, or nearly, gives none; among equal scores the first drawn is taken);
  4. the pairs, as OUT/round{r}/pairs.jsonl, go to train_dpo.py --data (the same loop and
     loss as offline DPO) with --sft-ckpt = the current policy and as reference the
     previous round's policy (--reference previous, the default) or the SFT model
     (--reference sft); its warm-up is --warmup-share of the round's steps;
  5. the new policy is judged on the evaluation prompts' --eval-split (dev by default:
     rounds, k and lr are chosen there) as evaluate.py does (sampled, T 1, seed 0): judge
     score, win rate and KL against the SFT model, answer length, skills.
A finished round (OUT/round{r}/round.json) is not redone when the script runs again with
the same settings and the same SFT and start checkpoints (by sha256); other settings, or a
retrained checkpoint at the same path, are refused. Other evaluation settings re-judge the
round's policy (never a table of mixed settings). OUT/table.md and OUT/results.json
(evaluate.py's JSON, for `python -m tools.plot frontier`) are written at the end.
"""

import json
import os
import random
import shlex
import subprocess
import time

import torch

import data
import devices
import flags
import tasks
import tokenizer
from checkpoint import atomic_write, file_digest
from errors import ArgumentParser, UserError, run_main
from evaluate import (answer_logps, held_out_rows, judge_answers, kl_estimate, summarize,
                      win_rate)
from sample import load_model
from tools.sweep import launcher

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLED = "sampled T=1"  # evaluate.py's name for its headline mode
# The settings that define a round's model: a round.json made with others is refused
ROUND_KEYS = ("start", "sft_ckpt", "prompts", "k", "temperature", "min_gap", "max_new_tokens",
              "beta", "lr", "warmup_share", "reference", "nproc", "train_flags", "seed",
              "sft_sha256", "start_sha256")
# ... and those of its evaluation: with others, the round's policy is judged again
EVAL_KEYS = ("eval_samples", "eval_limit", "eval_split")


def best_against_worst(scores, min_gap):
    """(best, worst) indices into one prompt's answer scores, or None when no pair is made:
    fewer than two answers, or best and worst less than min_gap apart (a tie or near-tie).
    Among equal scores the earliest answer is taken (answers are drawn independently, so
    their order is random).

    >>> best_against_worst([0.6, 1.0, 0.0, 1.0], 0.2)
    (1, 2)
    >>> best_against_worst([0.8, 1.0], 0.6) is None
    True
    """
    if len(scores) < 2:
        return None
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    return (best, worst) if scores[best] - scores[worst] >= min_gap - 1e-9 else None


def make_pairs(rows, texts, scored, min_gap):
    """The round's preference records (train_dpo.py's conversational format) and how many
    prompts gave none. Empty answers take no part: the data formats hold no empty message.

    >>> row = {"messages": [{"role": "user", "content": "2+2?"}], "meta": {"skill": "x"}}
    >>> judged = [[({"score": s}, 3) for s in (1.0, 0.0, 0.6)]]
    >>> pairs, ties = make_pairs([row], [["4.", "", "It is 4."]], judged, 0.2)
    >>> [pairs[0][k][0]["content"] for k in ("chosen", "rejected")], ties
    (['4.', 'It is 4.'], 0)
    """
    pairs, ties = [], 0
    for row, answers, judged in zip(rows, texts, scored):
        # an empty answer (<|im_end|> at once) has no text a pair file can hold: left out
        kept = [i for i, text in enumerate(answers) if text.strip()]
        picked = best_against_worst([judged[i][0]["score"] for i in kept], min_gap)
        if picked is None:
            ties += 1
            continue
        best, worst = kept[picked[0]], kept[picked[1]]
        pairs.append({"prompt": row["messages"],
                      "chosen": [{"role": "assistant", "content": answers[best]}],
                      "rejected": [{"role": "assistant", "content": answers[worst]}],
                      "skill": row["meta"]["skill"],
                      "scores": [judged[best][0]["score"], judged[worst][0]["score"]]})
    return pairs, ties


def round_prompts(n, seed, r):
    """Round r's N training prompts: tasks.py's generators (its training pool) with their
    own seed."""
    return tasks.make_prompts(n, random.Random(f"tinychat-onpolicy-{seed}-{r}"))


def warmup_steps(n_pairs, train_flags, share):
    """The warm-up of a round of n_pairs pairs: share of its optimizer steps (train_dpo.py's
    count for these flags), at least 1.

    >>> warmup_steps(400, "", 0.1), warmup_steps(400, "--epochs 2", 0.1)
    (2, 5)
    """
    args = flags.parse_dpo_args(shlex.split(train_flags) + ["--sft-ckpt", ""], "")
    steps = args.steps or max(1, int(args.epochs * (n_pairs // args.batch_size)))
    return max(1, round(share * steps))


def write_jsonl(path, rows):
    """One JSON object a line, written atomically (a killed run leaves no half file)."""
    payload = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    atomic_write(path, payload.encode("utf-8"))


def sample_round(policy_path, rows, r, args, enc, device):
    """k judged answers to each prompt from the policy: (texts, scored)."""
    policy = load_model(policy_path, args.tokenizer, device)
    _, answers, scored = judge_answers(policy, enc, rows, args.k, args.temperature,
                                       args.max_new_tokens, args.seed * 1000 + r, device,
                                       desc="sampling")
    im_end = data.Chat(enc).im_end
    texts = [[enc.decode([t for t in a if t != im_end]) for a in outs] for outs in answers]
    return texts, scored


def train_round(pairs_path, policy_path, reference_path, out, warmup, args):
    """train_dpo.py on the round's pairs (under torchrun with --nproc > 1)."""
    cmd = launcher(args.nproc) + [os.path.join(HERE, "train_dpo.py"), "--data", pairs_path,
                      "--sft-ckpt", policy_path, "--out-dir", out, "--beta", str(args.beta),
                      "--lr", str(args.lr), "--warmup-steps", str(warmup),
                      "--samples", "0", "--device", args.device,
                      "--tokenizer", args.tokenizer, *shlex.split(args.train_flags)]
    if reference_path != policy_path:
        cmd += ["--ref-ckpt", reference_path]
    code = subprocess.run(cmd, cwd=HERE).returncode
    if code != 0:
        raise UserError(f"train_dpo.py failed (exit {code}) on {pairs_path}; its command: "
                        + " ".join(shlex.quote(c) for c in cmd))


class HeldOut:
    """The held-out evaluation of tools/iterate.py: the SFT model's sampled answers once,
    then each policy's, judged and compared as evaluate.py does."""

    def __init__(self, sft_path, args, enc, device):
        self.args, self.enc, self.device = args, enc, device
        self.rows = held_out_rows(os.path.join(data.DATA_DIR, "eval_prompts.jsonl"),
                                  args.eval_split, args.eval_limit)
        self.sft = load_model(sft_path, args.tokenizer, device)
        self.sft_prompts, _, self.sft_scored = self.judge(self.sft, "SFT")

    def judge(self, model, name):
        return judge_answers(model, self.enc, self.rows, self.args.eval_samples, 1.0,
                             self.args.max_new_tokens, 0, self.device,
                             desc=f"evaluating {name}")

    def sft_results(self):
        return {f"{SAMPLED}/{k}": v for k, v in summarize(self.rows, self.sft_scored).items()}

    def __call__(self, path, name):
        model = load_model(path, self.args.tokenizer, self.device)
        prompts, answers, scored = self.judge(model, name)
        kl, se = kl_estimate(answer_logps(model, prompts, answers, self.device),
                             answer_logps(self.sft, prompts, answers, self.device))
        out = {f"{SAMPLED}/{k}": v for k, v in summarize(self.rows, scored).items()}
        out.update({f"{SAMPLED}/win_rate_vs_first": win_rate(self.sft_scored, scored),
                    f"{SAMPLED}/kl_vs_ref": kl, f"{SAMPLED}/kl_stderr": se})
        return out


def run_round(r, policy_path, args, enc, device, held_out):
    """Round r from policy_path: returns its record (also written as round.json)."""
    out = os.path.join(args.out_dir, f"round{r}")
    record_path = os.path.join(out, "round.json")
    settings = {k: getattr(args, k) for k in ROUND_KEYS}
    eval_settings = {k: getattr(args, k) for k in EVAL_KEYS}
    if os.path.exists(record_path):
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
        if record["settings"] != settings:
            changed = sorted(k for k in settings if record["settings"].get(k) != settings[k])
            raise UserError(f"{record_path} was made with other settings ({', '.join(changed)})"
                            "; use another --out-dir or remove it")
        print(f"round {r}: done already ({record_path})")
        if held_out is not None and record.get("eval_settings") != eval_settings:
            print(f"round {r}: judged again with the evaluation settings now asked for")
            evaluate_round(record, record_path, eval_settings, held_out)
        return record
    print(f"round {r}: policy {policy_path}", flush=True)
    t0 = time.time()
    rows = round_prompts(args.prompts, args.seed, r)
    texts, scored = sample_round(policy_path, rows, r, args, enc, device)
    pairs, ties = make_pairs(rows, texts, scored, args.min_gap)
    if not pairs:
        raise UserError(f"round {r}: all {len(rows)} prompts' answers tied: no pairs to train "
                        "on (more --k, a higher --temperature or a smaller --min-gap)")
    pairs_path = os.path.join(out, "pairs.jsonl")
    write_jsonl(pairs_path, pairs)
    t_sample = time.time() - t0
    print(f"round {r}: {len(pairs)} pairs from {len(rows)} prompts ({ties} all tied) in "
          f"{t_sample:.0f} s", flush=True)
    reference = args.sft_ckpt if args.reference == "sft" else policy_path
    warmup = warmup_steps(len(pairs), args.train_flags, args.warmup_share)
    train_round(pairs_path, policy_path, reference, out, warmup, args)
    t_train = time.time() - t0 - t_sample
    record = {"round": r, "settings": settings, "policy_in": policy_path,
              "reference": reference, "ckpt": os.path.join(out, "dpo.pt"),
              "pairs": len(pairs), "prompts": len(rows), "tied": ties, "warmup_steps": warmup,
              "sample_score": sum(s["score"] for ss in scored for s, _ in ss)
              / sum(len(ss) for ss in scored),
              "sample_s": t_sample, "train_s": t_train}
    if held_out is not None:
        evaluate_round(record, record_path, eval_settings, held_out)
    else:
        atomic_write(record_path, json.dumps(record, indent=1).encode("utf-8"))
    return record


def evaluate_round(record, record_path, eval_settings, held_out):
    """Judge a round's policy on the held-out prompts; the record, with its evaluation and
    the settings of it, written again."""
    t1 = time.time()
    record["eval"] = held_out(record["ckpt"], f"round {record['round']}")
    record["eval_s"], record["eval_settings"] = time.time() - t1, eval_settings
    atomic_write(record_path, json.dumps(record, indent=1).encode("utf-8"))


def table(records, sft, start):
    """The markdown table of the rounds (the SFT model, the start, then each round)."""
    m = SAMPLED + "/"
    lines = ["| policy | pairs (tied prompts) | sampled judge | seen | unseen | win vs SFT | "
             "KL from SFT, nats per answer | answer length | " + " | ".join(tasks.SKILLS)
             + " | round wall time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(tasks.SKILLS) + "---:|"]

    def row(name, pairs, e, wall):
        win = e.get(m + "win_rate_vs_first")
        kl = "" if win is None else f"{e[m + 'kl_vs_ref']:.2f} ± {e[m + 'kl_stderr']:.2f}"
        seen, unseen = (e.get(f"{m}{k}/score", float("nan")) for k in ("seen", "unseen"))
        return (f"| {name} | {pairs} | {e[m + 'score']:.3f} | {seen:.3f} | {unseen:.3f} | "
                f"{'' if win is None else f'{win:.3f}'} | {kl} | "
                f"{e[m + 'length']:.1f} | "
                + " | ".join(f"{e[f'{m}score/{s}']:.3f}" for s in tasks.SKILLS)
                + f" | {wall} |")
    lines.append(row("SFT", "", sft, ""))
    if start is not None:
        lines.append(row("start", "", start, ""))
    for rec in records:
        wall = f"{rec['sample_s'] + rec['train_s']:.0f} s"
        lines.append(row(f"round {rec['round']}", f"{rec['pairs']} ({rec['tied']})",
                         rec["eval"], wall))
    return "\n".join(lines)


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft-ckpt", default="out/sft.pt",
                        help="the SFT model: KL and win rate are measured against it")
    parser.add_argument("--start", default=None,
                        help="round 1's policy (default: the SFT model; e.g. out/dpo.pt to "
                        "continue offline DPO on-policy)")
    parser.add_argument("--out-dir", default="out/onpolicy", help="one folder per round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="number of rounds (chosen on the dev split: docs/onpolicy.md)")
    parser.add_argument("--prompts", type=int, default=1500, help="N: new prompts a round")
    parser.add_argument("--k", type=int, default=4, help="answers sampled per prompt")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--min-gap", type=float, default=0.2,
                        help="least judge-score gap between best and worst for a pair "
                        "(the judge's scores are 0, 0.6, 0.8 and 1.0)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest answer")
    parser.add_argument("--beta", type=float, default=flags.TINYCHAT_BETA, help="DPO beta")
    parser.add_argument("--lr", type=float, default=2e-4,
                        help="each round's peak learning rate (chosen on the dev split: "
                        "docs/onpolicy.md)")
    parser.add_argument("--warmup-share", type=float, default=0.1,
                        help="each round's lr warm-up, as a share of its optimizer steps")
    parser.add_argument("--reference", choices=("previous", "sft"), default="previous",
                        help="each round's DPO reference: the policy the round starts from "
                        "(the model its pairs were sampled from, so each round is the DPO "
                        "problem of its own data) or the SFT model")
    parser.add_argument("--train-flags", default="",
                        help="more train_dpo.py flags for every round, e.g. '--epochs 2'")
    parser.add_argument("--nproc", type=int, default=2, help="train_dpo.py processes")
    parser.add_argument("--eval-samples", type=int, default=4,
                        help="sampled answers per held-out prompt (0: no evaluation)")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="evaluate on N evenly spaced held-out prompts (default: all of "
                        "the split)")
    parser.add_argument("--eval-split", choices=("dev", "test"), default="dev",
                        help="the evaluation prompts' half each round is judged on: dev (to "
                        "choose rounds, k and lr on) or test (to report)")
    parser.add_argument("--tokenizer", default=tokenizer.DEFAULT_TOKENIZER, help=".tiktoken file")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts and samples")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    if args.min_gap <= 0:
        parser.error("--min-gap must be above 0: a pair's answers must differ in score")
    for name in ("rounds", "prompts", "k", "nproc"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    args.sft_ckpt = os.path.abspath(args.sft_ckpt)
    args.start = os.path.abspath(args.start) if args.start else args.sft_ckpt
    args.out_dir = os.path.abspath(args.out_dir)
    for path in (args.sft_ckpt, args.start):
        if not os.path.exists(path):
            raise UserError(f"no checkpoint at {path}: run python train_sft.py first")
    if not 0 <= args.warmup_share < 1:
        parser.error("--warmup-share must be in [0, 1)")
    args.sft_sha256, args.start_sha256 = file_digest(args.sft_ckpt), file_digest(args.start)
    device = devices.choose_device(args.device, False, 0, 1, torch.cuda.device_count())
    enc = tokenizer.load_tokenizer(args.tokenizer)
    held_out = (HeldOut(args.sft_ckpt, args, enc, device) if args.eval_samples else None)

    t0 = time.time()
    records, policy = [], args.start
    for r in range(1, args.rounds + 1):
        records.append(run_round(r, policy, args, enc, device, held_out))
        policy = records[-1]["ckpt"]
    print(f"{args.rounds} rounds in {time.time() - t0:.0f} s")
    if held_out is None:
        return
    results = {args.sft_ckpt: held_out.sft_results()}
    start = None
    if args.start != args.sft_ckpt:
        results[args.start] = start = held_out(args.start, "start")
    results.update({rec["ckpt"]: rec["eval"] for rec in records})
    text = table(records, results[args.sft_ckpt], start)
    with open(os.path.join(args.out_dir, "table.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=2)
    print(text)
    print(f"wrote {args.out_dir}/table.md and results.json")


if __name__ == "__main__":
    run_main(main)
