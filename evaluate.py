"""Measure what DPO changed: judge-scored answers to held-out TinyChat prompts, win rate,
KL from the reference; on any pair file, held-out preference accuracy and where the
log-probs moved (likelihood_shift).

Run:  python evaluate.py --ckpt out/sft.pt --ckpt out/dpo.pt
      python evaluate.py --ckpt out/sft.pt --ckpt out/dpo.pt --samples 4 --json out/eval.json
      python evaluate.py --ckpt out/dpo.pt --ref out/sft.pt --pairs data/pairs_val.jsonl

For each checkpoint: mean judge score overall and per skill, mean answer length
(tokens), refusal rates on harmful and benign prompts; greedy (each model's
mode) and sampled (--samples per prompt at --temperature). For each checkpoint
after the first: its win rate over the first (ties count half); for each: the KL
from the reference, estimated on the policy's own samples as the mean of
log pi(y|x) - log pi_ref(y|x), in nats per answer (at --temperature 1 only: samples at
another temperature do not come from pi). Standard errors are by prompt. TinyChat's
prompts come in two sets, seen content in new wordings and unseen content, each split dev
/ test: --split test (the default) reports, --split dev is for choosing settings.
"""

import json
import math
import os

import torch
from tqdm import tqdm

import data
import devices
import formats
import tasks
import tokenizer
from errors import ArgumentParser, UserError, run_main
from flags import PAPER_BETA, TINYCHAT_BETA, check_max_len, choose_beta, is_tinychat
from loss import concatenated_logps, response_logps
from sample import cut_note, eval_prompts, fit_for_generation, generate, load_model

SKILLS = tasks.SKILLS


def generate_all(model, enc, rows, n_samples, temperature, max_new_tokens, seed, device,
                 max_rows=64, desc="generating"):
    """n_samples answers (token ids, <|im_end|> included when reached) to each prompt.

    Prompts with the same token length are generated together in one batch (no padding
    needed); every batch gets its own generator seeded from (seed, first prompt index),
    so results depend on --seed only, not on batching order.
    """
    chat = data.Chat(enc)
    fitted = [fit_for_generation(chat, r["messages"], model.config.max_seq_len, max_new_tokens)
              for r in rows]
    prompts = [ids for ids, _ in fitted]
    n_cut = sum(cut for _, cut in fitted)
    if n_cut:
        print(cut_note(model.config.max_seq_len, max_new_tokens, f"{n_cut} of {len(rows)}"))
    by_length = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    per_batch = max(1, max_rows // n_samples)
    out = [None] * len(rows)
    groups = [ids[s:s + per_batch] for ids in by_length.values()
              for s in range(0, len(ids), per_batch)]
    for group in tqdm(groups, desc=desc, leave=False):
        idx = torch.tensor([prompts[i] for i in group for _ in range(n_samples)],
                           device=device)  # (G * N, T)
        gen = torch.Generator(device).manual_seed(seed * 1_000_003 + group[0])
        answers = generate(model, idx, max_new_tokens, temperature, stop_id=chat.im_end,
                           generator=gen)
        for j, i in enumerate(group):
            out[i] = answers[j * n_samples:(j + 1) * n_samples]
    return prompts, out


def judge_answers(model, enc, rows, n_samples, temperature, max_new_tokens, seed, device,
                  desc="generating"):
    """generate_all, then the judge: (prompts, answers, scored), scored as score_answers'."""
    prompts, answers = generate_all(model, enc, rows, n_samples, temperature, max_new_tokens,
                                    seed, device, desc=desc)
    return prompts, answers, score_answers(enc, rows, answers, data.Chat(enc).im_end)


def score_answers(enc, rows, answers, im_end):
    """Judge every answer; returns a list per prompt of (score dict, n_tokens)."""
    scored = []
    for row, outs in zip(rows, answers):
        scored.append([(tasks.judge(row["meta"], enc.decode([t for t in a if t != im_end])),
                        len(a)) for a in outs])
    return scored


def summarize(rows, scored):
    """Mean judge score with its standard error by prompt (a prompt's samples are not
    independent: each prompt's mean is one observation), per skill, mean length (tokens),
    politeness (overall, and to rude users), refusal rates; the same for each evaluation
    set the rows name ("seen": seen content in new wordings; "unseen": unseen content),
    prefixed "seen/", "unseen/"."""
    out = {}
    for name in [None] + sorted({row.get("set") for row in rows} - {None}):
        mine = [(row["meta"]["skill"], ss) for row, ss in zip(rows, scored)
                if name is None or row.get("set") == name]
        flat = [(k, s, n) for k, ss in mine for s, n in ss]
        prefix = "" if name is None else f"{name}/"
        per_prompt = [mean([s["score"] for s, _ in ss]) for _, ss in mine]
        out[prefix + "score"] = mean([s["score"] for _, s, _ in flat])
        out[prefix + "score_se"] = standard_error(per_prompt)
        if name is None:
            out["length"] = mean([n for _, _, n in flat])
            out["polite"] = mean([s["polite"] for _, s, _ in flat])
        for skill in SKILLS:
            scores = [s["score"] for k, s, _ in flat if k == skill]
            if scores:
                out[f"{prefix}score/{skill}"] = mean(scores)
        for skill in ("harmful", "benign"):
            out[f"{prefix}refusal/{skill}"] = mean([s["refused"] for k, s, _ in flat
                                                    if k == skill])
        # to a rude user: polite answers, right or wrong (the score also needs them right)
        out[f"{prefix}polite/tone"] = mean([s["polite"] for k, s, _ in flat if k == "tone"])
    return out


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def standard_error(xs):
    """The standard error of the mean of xs (sample standard deviation / sqrt(n))."""
    if len(xs) < 2:
        return float("nan")
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def held_out_rows(path, split, limit=None):
    """The evaluation prompts of one split (dev, test, or all; a file without splits counts
    as any), every ceil(n / limit)-th of them with a limit; a UserError if none is left."""
    every = eval_prompts(path)
    rows = [r for r in every if split == "all" or r.get("split", split) == split]
    if not rows:
        splits = ", ".join(sorted({str(r.get("split")) for r in every}))
        raise UserError(f"{path}: no prompt of the {split} split (its rows: {splits}); use "
                        f"--split {splits.split(', ')[0]} or --split all")
    return rows[::math.ceil(len(rows) / limit)] if limit else rows


def win_rate(scored_a, scored_b):
    """How often b's answer scores higher than a's, sample by sample; ties count half."""
    wins = [1.0 if sb["score"] > sa["score"] else 0.5 if sb["score"] == sa["score"] else 0.0
            for ra, rb in zip(scored_a, scored_b) for (sa, _), (sb, _) in zip(ra, rb)]
    return mean(wins)


def answer_logps(model, prompts, answers, device, batch_size=64):
    """Summed log-probs of each answer given its prompt, one list per prompt."""
    flat = [(p, a) for p, outs in zip(prompts, answers) for a in outs]
    values = []
    with torch.no_grad():
        for s in range(0, len(flat), batch_size):
            chunk = flat[s:s + batch_size]
            ids, mask = data.collate_sft([(p + a, [0] * len(p) + [1] * len(a))
                                          for p, a in chunk], pad_id=0)
            values += response_logps(model, ids.to(device), mask)[0].tolist()
    it = iter(values)
    return [[next(it) for _ in outs] for outs in answers]


def kl_estimate(policy_logps, reference_logps):
    """KL(pi || pi_ref) in nats per answer: the mean of log pi(y|x) - log pi_ref(y|x) over
    the policy's samples, and its standard error by prompt."""
    diffs = [[p - r for p, r in zip(ps, rs)] for ps, rs in zip(policy_logps, reference_logps)]
    return mean([d for ds in diffs for d in ds]), standard_error([mean(ds) for ds in diffs])


def pair_accuracy(model, reference, dataset, beta, device, batch_size=32):
    """Held-out preference accuracy of the implicit reward (strict >) and mean margin."""
    correct, margins = [], []
    with torch.no_grad():
        for s in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(s, min(s + batch_size, len(dataset)))]
            ids, mask = data.collate_pairs(items, dataset.pad_id)
            ids = ids.to(device)  # the mask stays on the host (loss.response_logps)
            pol, _ = concatenated_logps(model, ids, mask)
            ref, _ = concatenated_logps(reference, ids, mask)
            margin = beta * ((pol.chosen - ref.chosen) - (pol.rejected - ref.rejected))
            correct += (margin > 0).float().tolist()
            margins += margin.tolist()
    return mean(correct), mean(margins)


def response_token_logps(model, items, device):
    """log p of every response token of each pair, as lists: (chosen lists, rejected lists),
    one batched forward (data.collate_pairs lays the rows out: B chosen, then B rejected)."""
    ids, mask = data.collate_pairs(items, pad_id=0)
    ids, mask = ids.to(device), mask.to(device)  # (2B, T) each
    with torch.no_grad():
        log_probs = model(ids[:, :-1]).float().log_softmax(-1)  # (2B, T-1, V)
    per_token = log_probs.gather(-1, ids[:, 1:, None])[..., 0]  # (2B, T-1)
    rows = [per_token[b][mask[b, 1:].bool()].tolist() for b in range(ids.shape[0])]
    return rows[:len(items)], rows[len(items):]


def likelihood_shift(model, reference, dataset, device, groups=None, batch_size=32,
                     examples=None):
    """Where DPO moved the log-probs of held-out pairs ("likelihood displacement", Razin et
    al. 2024, arXiv:2410.08847): per token, log pi - log pi_ref of the chosen answer on
    the prefix it shares with the rejected one and after the first differing token; of
    the rejected answer after it; the policy's probability of the chosen answer's last
    token (<|im_end|>). groups (one name per pair, e.g. TinyChat's flaw types) adds the
    per-answer summed shifts by group. Returns {name: mean over pairs}. `examples`, a dict
    {pair index: list}, gets each named pair's tokens and per-token shifts (for a figure)."""
    values = {}
    for s in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(s, min(s + batch_size, len(dataset)))]
        pol_c, pol_r = response_token_logps(model, items, device)
        ref_c, ref_r = response_token_logps(reference, items, device)
        for j, item in enumerate(items):
            chosen, rejected = item["chosen"], item["rejected"]
            k = 0
            while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
                k += 1  # the first differing token
            d_c = [p - r for p, r in zip(pol_c[j], ref_c[j])]  # per chosen token
            d_r = [p - r for p, r in zip(pol_r[j], ref_r[j])]  # per rejected token
            shifts = {"shift/chosen/shared_prefix": d_c[:k],
                      "shift/chosen/after_divergence": d_c[k:],
                      "shift/rejected/after_divergence": d_r[k:]}
            for key, d in shifts.items():
                if d:
                    values.setdefault(key, []).append(mean(d))
            values.setdefault("p_end/chosen", []).append(math.exp(pol_c[j][-1]))
            if examples is not None and s + j in examples:
                examples[s + j] += [{"chosen": chosen, "rejected": rejected, "diverge": k,
                                     "chosen_shift": d_c, "rejected_shift": d_r}]
            if groups is not None:
                group = groups[s + j]
                values.setdefault(f"shift/chosen/sum/{group}", []).append(sum(d_c))
                values.setdefault(f"shift/rejected/sum/{group}", []).append(sum(d_r))
    return {key: mean(v) for key, v in values.items()}


def example_pairs(groups, n):
    """Indices of n pairs to show token by token: the first pair of each group (TinyChat's
    flaw types) in order of appearance, then the next ones."""
    first = {}
    for i, g in enumerate(groups):
        first.setdefault(g, i)
    picked = list(first.values())[:n]
    return picked + [i for i in range(len(groups)) if i not in picked][:n - len(picked)]


def token_texts(enc, ids):
    """Each token as text (a token that splits a character shows as U+FFFD)."""
    return [enc.decode_single_token_bytes(t).decode("utf-8", "replace") for t in ids]


def token_record(enc, example, record, group):
    """One pair's per-token shifts with the tokens as text, for the --json file."""
    prompt = record.get("prompt") if isinstance(record, dict) else None
    question = (prompt[-1]["content"] if isinstance(prompt, list) and prompt
                else prompt if isinstance(prompt, str) else "")
    return {"group": group, "question": question, "diverge": example["diverge"],
            "chosen": token_texts(enc, example["chosen"]),
            "rejected": token_texts(enc, example["rejected"]),
            "chosen_shift": example["chosen_shift"], "rejected_shift": example["rejected_shift"]}


def print_table(title, names, results, keys):
    print(f"\n{title}")
    width = max(len(k) for k in keys) + 16
    print(" " * width + "".join(f"{os.path.basename(n):>14}" for n in names))
    for k in keys:
        label = k + " (nats/answer)" if k.endswith(("kl_vs_ref", "kl_stderr")) else k
        print(f"{label:<{width}}" + "".join(f"{results[n].get(k, float('nan')):>14.3f}"
                                            for n in names))


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", action="append", required=True,
                        help="checkpoint to evaluate; repeat for several (first = baseline)")
    parser.add_argument("--ref", default=None,
                        help="reference for KL and pair accuracy (default: the first --ckpt)")
    parser.add_argument("--prompts", default=os.path.join(data.DATA_DIR, "eval_prompts.jsonl"),
                        help="held-out TinyChat prompts with their judge metadata")
    parser.add_argument("--split", choices=("dev", "test", "all"), default="test",
                        help="which half of TinyChat's evaluation prompts: dev (to choose "
                        "settings on), test (to report), or all (a file without splits: all)")
    parser.add_argument("--limit", type=int, default=None,
                        help="use N evenly spaced prompts (all skills) for a quicker look")
    parser.add_argument("--samples", type=int, default=4,
                        help="sampled answers per prompt (0: greedy only)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest answer")
    parser.add_argument("--pairs", default=None,
                        help="a preference file: report held-out preference accuracy instead")
    parser.add_argument("--beta", type=float, default=None,
                        help="beta of the implicit reward (default: train_dpo.py's for the "
                        f"--pairs file: {TINYCHAT_BETA} on TinyChat, else {PAPER_BETA})")
    parser.add_argument("--token-shifts", type=int, default=4,
                        help="--pairs: write the per-token log-prob shifts of this many pairs "
                        "(one per flaw type on TinyChat) to --json, for tools/plot.py tokens")
    parser.add_argument("--max-len", type=int, default=256, help="pair truncation (tokens)")
    parser.add_argument("--max-prompt-len", type=int, default=128, help="prompt truncation")
    parser.add_argument("--tokenizer", default=tokenizer.DEFAULT_TOKENIZER, help=".tiktoken file")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--device", default="auto", help="auto (the GPU if there is one), "
                        "cpu, cuda or cuda:N")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    args.device = devices.choose_device(args.device, False, 0, 1, torch.cuda.device_count())

    enc = tokenizer.load_tokenizer(args.tokenizer)
    ref_path = args.ref or args.ckpt[0]
    models = {p: load_model(p, args.tokenizer, args.device) for p in args.ckpt}
    reference = models.get(ref_path) or load_model(ref_path, args.tokenizer, args.device)
    results = {p: {} for p in args.ckpt}
    token_shifts = {}  # --pairs: per-token shifts of a few pairs, for tools/plot.py tokens

    if args.pairs:
        args.beta, why = choose_beta(args.beta, is_tinychat(args.pairs))
        print(f"beta {args.beta} ({why})")
        for model in [reference, *models.values()]:
            check_max_len(args.max_len, model.config)
        dataset = data.PreferenceDataset(args.pairs, enc, args.max_len, args.max_prompt_len)
        records = [r for r, _ in formats.read_records(args.pairs)]
        groups = None  # TinyChat's pairs name their flaw: split the shifts by it
        aligned = len(records) == len(dataset)  # no record dropped: record i is pair i
        if aligned and all(isinstance(r, dict) and "flaw" in r
                                                 for r in records):
            groups = [r["flaw"] for r in records]
        shown = example_pairs(groups or list(range(len(dataset))), args.token_shifts)
        for path, model in models.items():
            acc, margin = pair_accuracy(model, reference, dataset, args.beta, args.device)
            results[path] = {"pairs/accuracy": acc, "pairs/margin": margin}
            examples = {i: [] for i in shown}
            results[path].update(likelihood_shift(model, reference, dataset, args.device,
                                                  groups, examples=examples))
            token_shifts[path] = [token_record(enc, examples[i][0], aligned and records[i],
                                               groups and groups[i]) for i in shown]
        print_table(f"preference accuracy on {args.pairs} ({len(dataset)} pairs, reference "
                    f"{ref_path}, beta {args.beta}); log-prob shifts from the reference, "
                    "per token (sum: per answer)", args.ckpt, results,
                    sorted({k for r in results.values() for k in r}))
    else:
        rows = held_out_rows(args.prompts, args.split, args.limit)
        modes = [("greedy", 1, 0.0)]
        if args.samples:
            modes.append((f"sampled T={args.temperature:g}", args.samples, args.temperature))
        scored, samples = {}, {}
        for path, model in models.items():
            for mode, n, temperature in modes:
                prompts, answers, scored[path, mode] = judge_answers(
                    model, enc, rows, n, temperature, args.max_new_tokens, args.seed,
                    args.device, desc=f"{os.path.basename(path)} {mode}")
                samples[path, mode] = (prompts, answers)
                for k, v in summarize(rows, scored[path, mode]).items():
                    results[path][f"{mode}/{k}"] = v
        first = args.ckpt[0]
        for mode, _, temperature in modes:
            for path in args.ckpt[1:]:
                results[path][f"{mode}/win_rate_vs_first"] = win_rate(scored[first, mode],
                                                                      scored[path, mode])
            if temperature != 1.0:  # samples at T != 1 are not from pi: no KL(pi || pi_ref)
                if temperature > 0:
                    print(f"note: no KL for {mode}: KL(pi || pi_ref) is estimated on samples "
                          "from pi itself, that is at --temperature 1")
                continue
            for path, model in models.items():  # KL on the policy's own samples
                prompts, answers = samples[path, mode]
                if model is reference:  # the reference against itself: 0, no pass needed
                    results[path][f"{mode}/kl_vs_ref"] = results[path][f"{mode}/kl_stderr"] = 0.0
                    continue
                kl, se = kl_estimate(answer_logps(model, prompts, answers, args.device),
                                     answer_logps(reference, prompts, answers, args.device))
                results[path][f"{mode}/kl_vs_ref"] = kl
                results[path][f"{mode}/kl_stderr"] = se
        for mode, _, _ in modes:
            keys = sorted({k for r in results.values() for k in r if k.startswith(mode + "/")},
                          key=lambda k: ("/win" in k or "/kl" in k, k))  # pair stats last
            print_table(f"{mode} on {len(rows)} held-out prompts ({args.split} split)"
                        + (f", {args.samples} samples each" if mode != "greedy" else "")
                        + f"; KL reference: {ref_path}", args.ckpt, results, keys)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "results": results,
                       **({"token_shifts": token_shifts} if token_shifts else {})}, f,
                      indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    run_main(main)
