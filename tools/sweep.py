"""Train every loss of the DPO family from one SFT checkpoint, measure each on the held-out
prompts, and print the README's table; plus a beta sweep of plain DPO (Eq. 7), the
reward-KL trade-off of the paper's Figure 2 in miniature.

    python -m tools.sweep                                  # everything (about 1 h on 2 cores)
    python -m tools.sweep --runs sigmoid ipo simpo         # a few rows
    python -m tools.sweep --list                           # the runs and their flags

Each run is `train_dpo.py` under torchrun with the default settings plus the flags shown
in the table (the data, schedule and SFT checkpoint are the same for all); runs that can
share the reference's precomputed log-probs do (`--precompute-ref`, one cache copied from
run to run). Then one `evaluate.py` call scores the SFT model once and every run against
it, on the dev split of the evaluation prompts by default (a sweep is where settings are
chosen) or on --split test (to report the chosen ones). A finished run is not trained
again (its folder holds dpo.pt and run.json) unless --retrain, nor are the same models (by
their bytes) judged again with the same settings; results go to OUT/table_SPLIT.md and
OUT/results_SPLIT.json.
"""

import contextlib
import glob
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from checkpoint import file_digest
from errors import ArgumentParser, UserError, run_main
from flags import parse_dpo_args

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository

# (name, flags): one row each. The beta of each variant is its paper's scale where it
# has its own (per-token averages need a larger one); the rest use the default.
RUNS = [
    ("sigmoid", []),  # DPO, Eq. 7, with train_dpo.py's defaults
    ("rpo", ["--sft-alpha", "1.0"]),  # + the chosen answer's NLL (Pang et al. 2024)
    ("conservative", ["--label-smoothing", "0.1"]),
    ("robust", ["--loss", "robust", "--label-smoothing", "0.1"]),
    ("ipo", ["--loss", "ipo", "--beta", "0.5"]),
    ("hinge", ["--loss", "hinge"]),
    ("norm", ["--loss", "norm", "--beta", "10"]),
    ("dpop", ["--loss", "dpop", "--dpop-lambda", "50"]),
    ("simpo", ["--loss", "simpo", "--beta", "2.5", "--simpo-gamma", "1.25"]),
    ("rdpo", ["--loss", "rdpo", "--rdpo-alpha", "0.05"]),
    ("bco_pair", ["--loss", "bco_pair"]),
    ("nca_pair", ["--loss", "nca_pair"]),
    ("apo_zero", ["--loss", "apo_zero"]),
    ("sppo_hard", ["--loss", "sppo_hard"]),
    ("orpo", ["--loss", "orpo", "--beta", "0.1"]),
    ("trdpo", ["--sync-ref-every", "64", "--sync-ref-alpha", "0.6"]),
    # The beta sweep of plain DPO (the default beta is the "sigmoid" row above)
    ("beta-0.1", ["--beta", "0.1"]),
    ("beta-0.5", ["--beta", "0.5"]),
    ("beta-1", ["--beta", "1"]),
    ("beta-5", ["--beta", "5"]),
    # and of its peak learning rate (the default, 1e-4, is the "sigmoid" row)
    ("lr-2.5e-5", ["--lr", "2.5e-5"]),
    ("lr-5e-5", ["--lr", "5e-5"]),
    ("lr-2e-4", ["--lr", "2e-4"]),
]
NO_CACHE = ("simpo", "orpo", "trdpo")  # no reference, or a moving one


def launcher(nproc):
    """The command that starts a script in nproc processes: torchrun, or plain Python."""
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}"]
    return [sys.executable]


def run_logged(cmd, log_path):
    """Run cmd with its output in log_path; a failure names the log and what went wrong
    (the run's first `error:` line, else its last line)."""
    with open(log_path, "w", encoding="utf-8") as log:
        code = subprocess.run(cmd, cwd=HERE, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()] or ["(no output)"]
        said = next((line for line in lines if line.startswith("error: ")), lines[-1])
        raise UserError(f"{log_path}: the run failed (exit {code}): {said}")


def done_before(path, settings):
    """The record at path if it was made with these settings, else None."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    return record if record.get("settings") == settings else None


def run_settings(flags, sft_ckpt):
    """Every setting of a run, train_dpo.py's defaults included (a changed default retrains
    the runs it touches); None for flags train_dpo.py refuses (its run then fails and its
    log says why)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = parse_dpo_args(flags + ["--sft-ckpt", sft_ckpt], "")
    except SystemExit:
        return None
    return {k: v for k, v in sorted(vars(args).items()) if k not in ("out_dir", "quiet")}


def train(name, flags, args, sft_sha256):
    """One train_dpo.py run in OUT/NAME from the SFT model whose bytes hash to sft_sha256;
    returns its run.json record."""
    out = os.path.join(args.out_dir, name)
    record_path = os.path.join(out, "run.json")
    flags = list(flags) + shlex.split(args.train_flags)
    if name not in NO_CACHE:
        flags.append("--precompute-ref")
    settings = run_settings(flags, args.sft_ckpt)
    if os.path.exists(record_path) and not args.retrain:
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
        # trained already, with these very settings from this very SFT model
        if (settings is not None and record.get("settings") == settings
                and record.get("sft_sha256") == sft_sha256):
            return record
    if name not in NO_CACHE:  # train_dpo.py keys each cache by SFT model, data and flags:
        os.makedirs(os.path.join(out, "dpo"), exist_ok=True)  # it takes only a matching one
        for cache in glob.glob(os.path.join(args.out_dir, "*", "dpo", "ref_logps_*.pt")):
            if not os.path.exists(os.path.join(out, "dpo", os.path.basename(cache))):
                shutil.copy(cache, os.path.join(out, "dpo"))
    cmd = launcher(args.nproc) + [os.path.join(HERE, "train_dpo.py"), "--sft-ckpt", args.sft_ckpt,
                      "--out-dir", out, "--samples", "0", "--quiet", *flags]
    print(f"[{name}] {' '.join(flags)}", flush=True)
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    run_logged(cmd, os.path.join(out, "train.log"))
    with open(os.path.join(out, "dpo", "metrics.jsonl"), encoding="utf-8") as f:
        last = [json.loads(line) for line in f][-1]
    record = {"name": name, "flags": flags, "settings": settings, "sft_sha256": sft_sha256,
              "wall_s": time.time() - t0,
              "val_accuracy": last.get("val/rewards/accuracies")}
    with open(record_path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    return record


def table(runs, results, sft_path, samples, train_flags, split):
    """The README table (markdown) from the run records and evaluate.py's results."""
    mode = "sampled T=1/"
    sft = results[sft_path]
    lines = [f"{split} split. SFT: sampled judge score {sft[mode + 'score']:.3f} (seen content "
             f"{sft[mode + 'seen/score']:.3f}, unseen {sft[mode + 'unseen/score']:.3f}), answer "
             f"length {sft[mode + 'length']:.1f} tokens ({samples} samples per held-out prompt)"
             + (f"; every run also had `{train_flags}`" if train_flags else "") + ".", "",
             "| run | flags | sampled judge | seen | unseen | win vs SFT | KL(π‖π_ref), nats "
             "per answer | answer length | held-out pair acc. | wall time |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        r = results[os.path.join(run["out"], "dpo.pt")]
        flags = " ".join(dict(RUNS)[run["name"]]) or "(defaults)"
        acc = run["val_accuracy"]
        lines.append(
            f"| {run['name']} | `{flags}` | {r[mode + 'score']:.3f} "
            f"({r[mode + 'score'] - sft[mode + 'score']:+.3f}) | "
            f"{r[mode + 'seen/score']:.3f} | {r[mode + 'unseen/score']:.3f} | "
            f"{r[mode + 'win_rate_vs_first']:.3f} | {r[mode + 'kl_vs_ref']:.2f} ± "
            f"{r[mode + 'kl_stderr']:.2f} | {r[mode + 'length']:.1f} | "
            f"{'n/a' if acc is None else f'{acc:.3f}'} | {run['wall_s']:.0f} s |")
    return "\n".join(lines)


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=[name for name, _ in RUNS],
                        help="which rows (default: all)")
    parser.add_argument("--sft-ckpt", default="out/sft.pt", help="the common starting point")
    parser.add_argument("--out-dir", default="out/sweep", help="one folder per run, the table")
    parser.add_argument("--nproc", type=int, default=2, help="processes per run (torchrun)")
    parser.add_argument("--samples", type=int, default=4,
                        help="sampled answers per held-out prompt (evaluate.py)")
    parser.add_argument("--split", choices=("dev", "test"), default="dev",
                        help="the evaluation prompts' half to judge on: dev, to choose "
                        "settings on (the default), or test, to report them")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate on N evenly spaced held-out prompts (default: all of "
                        "the split)")
    parser.add_argument("--train-flags", default="",
                        help="extra train_dpo.py flags for every run, e.g. '--steps 50'")
    parser.add_argument("--retrain", action="store_true", help="train finished runs again")
    parser.add_argument("--list", action="store_true", help="print the runs and stop")
    args = parser.parse_args(argv)
    known = dict(RUNS)
    if args.list:
        for name, flags in RUNS:
            print(f"{name:14} {' '.join(flags) or '(defaults)'}")
        return
    unknown = [n for n in args.runs if n not in known]
    if unknown:
        parser.error(f"unknown runs {unknown}; see --list")
    args.out_dir, args.sft_ckpt = os.path.abspath(args.out_dir), os.path.abspath(args.sft_ckpt)
    if not os.path.exists(args.sft_ckpt):
        raise UserError(f"no SFT checkpoint at {args.sft_ckpt}: run python train_sft.py")
    sft_sha256 = file_digest(args.sft_ckpt)  # once: every run starts from it

    print("beta: each run's --beta where it has one, else train_dpo.py's default for the "
          "data (2.0 on TinyChat, 0.1 on other data); each OUT/RUN/train.log opens with it")
    t0 = time.time()
    runs = []
    for name in args.runs:
        record = train(name, known[name], args, sft_sha256)
        record["out"] = os.path.join(args.out_dir, name)
        runs.append(record)
    results_path = os.path.join(args.out_dir, f"results_{args.split}.json")
    cmd = [sys.executable, os.path.join(HERE, "evaluate.py"), "--samples", str(args.samples),
           "--split", args.split, "--json", results_path]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    ckpts = [args.sft_ckpt] + [os.path.join(run["out"], "dpo.pt") for run in runs]
    for path in ckpts:  # the SFT model first: the one every run is compared with
        cmd += ["--ckpt", path]
    # the same models, byte for byte, judged the same way: evaluate.py's results stand
    settings = {"evaluate": cmd[2:],
                "sha256": [sft_sha256] + [file_digest(path) for path in ckpts[1:]]}
    if (not os.path.exists(results_path)
            or done_before(results_path + ".done", settings) is None):
        print(f"evaluating {len(runs)} runs and the SFT model", flush=True)
        run_logged(cmd, os.path.join(args.out_dir, "evaluate.log"))
        with open(results_path + ".done", "w", encoding="utf-8") as f:
            json.dump({"settings": settings}, f, indent=1)
    else:
        print(f"evaluated already: {results_path} (the same models and settings)", flush=True)
    with open(results_path, encoding="utf-8") as f:
        results = json.load(f)["results"]
    text = table(runs, results, args.sft_ckpt, args.samples, args.train_flags, args.split)
    table_path = os.path.join(args.out_dir, f"table_{args.split}.md")
    with open(table_path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(text)
    print(f"\nwrote {table_path} and {results_path} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    run_main(main)
