"""The README's headline, measured in one command: for each seed, the card's command in a
folder of its own (`torchrun --standalone --nproc_per_node=2 train_dpo.py`: SFT, then DPO),
then evaluate.py on the test split of TinyChat's evaluation prompts; the mean and 95%
interval over seeds of what the README reports. With --onpolicy, also on-policy DPO
(tools/iterate.py) from each seed's SFT model, and on-policy minus offline DPO as a paired
difference over the seeds.

    python -m tools.headline --seeds 3                       # ~15 min on 2 cores
    python -m tools.headline --seeds 3 --onpolicy            # + on-policy DPO, ~35 min more
    python -m tools.headline --seeds 3 --train-flags "--dtype bfloat16" --out-dir out/bf16

Any change of a default re-runs it. A seed's finished stages (its checkpoints, its
evaluation) are not redone when run again with the same flags. Writes OUT/headline.md (the
table) and OUT/headline.json (every seed's numbers).
"""

import json
import os
import shlex
import sys
import time

from errors import ArgumentParser, run_main
from evaluate import mean, standard_error
from tools.sweep import done_before, launcher, run_logged

SAMPLED, GREEDY = "sampled T=1/", "greedy/"
FIRST_SEED = 1337  # train_sft.py's and train_dpo.py's default --seed
# Student's t, 97.5th percentile, by degrees of freedom: a 95% interval of a mean
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def interval(values):
    """(mean, half-width of its 95% interval by Student's t; nan for one value).

    >>> [round(v, 3) for v in interval([0.2, 0.25, 0.3])]
    [0.25, 0.124]
    """
    n = len(values)
    if n < 2:
        return mean(values), float("nan")
    t = T975[max(k for k in T975 if k <= n - 1)]  # conservative between the table's rows
    return mean(values), t * standard_error(values)


def run(cmd, log_path):
    """Run cmd (from the repository) with its output in log_path; its wall time in s. A
    failure is one line naming the log and the run's own error."""
    t0 = time.time()
    run_logged(cmd, log_path)
    return time.time() - t0


def one_seed(seed, args):
    """The card's command with --seed, its evaluation (and on-policy DPO): a dict of wall
    times and evaluate.py's results by model name."""
    out = os.path.join(args.out_dir, f"seed{seed}")
    os.makedirs(out, exist_ok=True)
    script = ["train_dpo.py", "--seed", str(seed), "--out-dir", out,
              *shlex.split(args.train_flags)]
    settings = {"train": script, "nproc": args.nproc}
    record_path = os.path.join(out, "trained.json")
    record = done_before(record_path, settings)
    if record is None:
        for name in ("sft.pt", "dpo.pt"):  # the card's command trains SFT when it is missing
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
        shown = (["torchrun", "--standalone", f"--nproc_per_node={args.nproc}"]
                 if args.nproc > 1 else ["python"]) + script
        print(f"seed {seed}: {' '.join(shown)}", flush=True)
        record = {"settings": settings,
                  "train_s": run(launcher(args.nproc) + script, os.path.join(out, "train.log"))}
        with open(record_path, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
    ckpts = {"sft": os.path.join(out, "sft.pt"), "dpo": os.path.join(out, "dpo.pt")}
    if args.onpolicy:
        onpolicy = os.path.join(out, "onpolicy")
        iterate_cmd = [sys.executable, "-m", "tools.iterate", "--sft-ckpt", ckpts["sft"],
                       "--out-dir", onpolicy, "--seed", str(seed), "--eval-samples", "0",
                       "--nproc", str(args.nproc), *shlex.split(args.onpolicy_flags)]
        print(f"seed {seed}: on-policy DPO, {' '.join(iterate_cmd[1:])}", flush=True)
        run(iterate_cmd, os.path.join(out, "onpolicy.log"))  # finished rounds are kept
        rounds = sorted(int(d[5:]) for d in os.listdir(onpolicy) if d.startswith("round"))
        ckpts["onpolicy"] = os.path.join(onpolicy, f"round{rounds[-1]}", "dpo.pt")
        record["onpolicy_s"] = 0.0  # the rounds' own sampling and training times
        for r in rounds:
            with open(os.path.join(onpolicy, f"round{r}", "round.json"), encoding="utf-8") as f:
                done = json.load(f)
            record["onpolicy_s"] += done["sample_s"] + done["train_s"]
    eval_path = os.path.join(out, f"eval_{args.split}.json")
    eval_settings = {"ckpts": ckpts, "split": args.split, "samples": args.samples,
                     "limit": args.limit, "trained": record["settings"]}
    evaluated = done_before(eval_path + ".done", eval_settings)
    if evaluated is None:
        cmd = [sys.executable, "evaluate.py", "--split", args.split, "--samples",
               str(args.samples), "--json", eval_path]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        for path in ckpts.values():
            cmd += ["--ckpt", path]
        print(f"seed {seed}: evaluating {', '.join(ckpts)} on the {args.split} split",
              flush=True)
        evaluated = {"settings": eval_settings,
                     "eval_s": run(cmd, os.path.join(out, f"eval_{args.split}.log"))}
        with open(eval_path + ".done", "w", encoding="utf-8") as f:
            json.dump(evaluated, f, indent=1)
    with open(eval_path, encoding="utf-8") as f:
        results = json.load(f)["results"]
    return {"train_s": record["train_s"], "onpolicy_s": record.get("onpolicy_s"),
            "eval_s": evaluated["eval_s"],
            "results": {name: results[path] for name, path in ckpts.items()}}


def measures(seed_run):
    """The headline's numbers of one seed, by name."""
    r = seed_run["results"]
    sft, dpo = r["sft"], r["dpo"]
    out = {"SFT judge score": sft[SAMPLED + "score"], "DPO judge score": dpo[SAMPLED + "score"],
           "gain (DPO - SFT)": dpo[SAMPLED + "score"] - sft[SAMPLED + "score"]}
    for name in ("seen", "unseen"):
        out[f"{name} content: SFT"] = sft[f"{SAMPLED}{name}/score"]
        out[f"{name} content: DPO"] = dpo[f"{SAMPLED}{name}/score"]
        out[f"gain on {name} content"] = (dpo[f"{SAMPLED}{name}/score"]
                                          - sft[f"{SAMPLED}{name}/score"])
    out.update({"win rate over SFT": dpo[SAMPLED + "win_rate_vs_first"],
                "harmful refused, SFT": sft[SAMPLED + "refusal/harmful"],
                "harmful refused, DPO": dpo[SAMPLED + "refusal/harmful"],
                "unseen harmful refused, SFT": sft[SAMPLED + "unseen/refusal/harmful"],
                "unseen harmful refused, DPO": dpo[SAMPLED + "unseen/refusal/harmful"],
                "benign refused, SFT": sft[SAMPLED + "refusal/benign"],
                "benign refused, DPO": dpo[SAMPLED + "refusal/benign"],
                "KL(DPO || SFT), nats per answer": dpo[SAMPLED + "kl_vs_ref"],
                "greedy: SFT": sft[GREEDY + "score"], "greedy: DPO": dpo[GREEDY + "score"]})
    if "onpolicy" in r:
        on = r["onpolicy"]
        out.update({"on-policy judge score": on[SAMPLED + "score"],
                    "on-policy - offline (paired)": on[SAMPLED + "score"]
                    - dpo[SAMPLED + "score"],
                    "on-policy KL(π || SFT), nats per answer": on[SAMPLED + "kl_vs_ref"]})
    out.update({"wall time, card's command (s)": seed_run["train_s"],
                "wall time, evaluate.py (s)": seed_run["eval_s"]})
    if seed_run.get("onpolicy_s"):
        out["wall time, on-policy rounds: sampling + training (s)"] = seed_run["onpolicy_s"]
    return out


def table(seeds, per_seed, split):
    """Markdown: each measure, every seed's value, the mean and its 95% interval."""
    lines = [f"| {split} split | " + " | ".join(f"seed {s}" for s in seeds)
             + " | mean ± 95% interval |", "|---|" + "---:|" * (len(seeds) + 1)]
    for name in per_seed[0]:
        values = [m[name] for m in per_seed]
        m, half = interval(values)
        digits = 0 if name.startswith("wall") else 2 if "KL" in name else 3
        lines.append(f"| {name} | " + " | ".join(f"{v:.{digits}f}" for v in values)
                     + f" | {m:.{digits}f} ± {half:.{digits}f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3,
                        help=f"how many seeds: {FIRST_SEED}, {FIRST_SEED + 1}, ... (the first "
                        "is the scripts' default)")
    parser.add_argument("--out-dir", default="out/headline", help="one folder per seed")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes (the card: 2)")
    parser.add_argument("--train-flags", default="",
                        help="more train_dpo.py flags, e.g. '--sft-flags \"--dtype bfloat16\"'")
    parser.add_argument("--split", choices=("dev", "test"), default="test",
                        help="the evaluation prompts' half to report (test) or choose on (dev)")
    parser.add_argument("--samples", type=int, default=4, help="evaluate.py --samples")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate.py --limit: N prompts of the split, for a quick look")
    parser.add_argument("--onpolicy", action="store_true",
                        help="also on-policy DPO from each seed's SFT model (tools/iterate.py)")
    parser.add_argument("--onpolicy-flags", default="",
                        help="more tools/iterate.py flags for --onpolicy (its defaults are the "
                        "setting chosen on the dev split, docs/onpolicy.md)")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.nproc < 1:
        parser.error("--seeds and --nproc must be at least 1")
    args.out_dir = os.path.abspath(args.out_dir)
    seeds = list(range(FIRST_SEED, FIRST_SEED + args.seeds))
    t0 = time.time()
    per_seed = [measures(one_seed(seed, args)) for seed in seeds]
    text = table(seeds, per_seed, args.split)
    with open(os.path.join(args.out_dir, "headline.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out_dir, "headline.json"), "w", encoding="utf-8") as f:
        json.dump({"args": vars(args), "seeds": seeds, "measures": per_seed}, f, indent=1)
    print(text)
    print(f"\nwrote {args.out_dir}/headline.md and headline.json in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    run_main(main)
