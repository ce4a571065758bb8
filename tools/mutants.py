"""A mutation check of the core: plant one deliberate bug at a time in a copy of the tree,
run the tests that should catch it, and print which test did (or that none did).

    python -m tools.mutants                      # this tree (a few minutes on 2 cores)
    python -m tools.mutants --tree /tmp/old      # another checkout, e.g. an older commit
    python -m tools.mutants --only rdpo-sign     # some mutants

Run by hand, not in CI. Each mutant replaces one exact piece of code (it must occur in
the file); a mutant is killed when its tests fail (pytest exit 1), survives when they
pass (exit 0) or when none of the named tests exists in that tree (exit 5).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOSS_TESTS = ["tests/test_loss.py", "tests/test_parity.py", "tests/test_docstrings.py",
              "tests/test_flags.py", "-k", "not sweep and not compile and not bf16 and not "
              "sample and not shape and not evaluate and not schedule and not trdpo"]
FLAG_TESTS = ["tests/test_flags.py", "-k", "away_from_step_zero or step_zero or sft_alpha or rdpo"]
DDP_TESTS = ["tests/test_train.py", "-k", "two_processes or torchrun"]

# (name, file, code, mutated code, tests)
MUTANTS = [
    ("sigmoid-sign", "loss.py", "losses = -F.logsigmoid(beta * h)  # Eq. 7",
     "losses = -F.logsigmoid(-beta * h)  # Eq. 7", LOSS_TESTS),
    ("conservative-sign", "loss.py",
     "losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * h)",
     "losses = (1 - label_smoothing) * losses + label_smoothing * F.logsigmoid(-beta * h)",
     LOSS_TESTS),
    ("robust-sign", "extras/losses.py", "+ eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)",
     "- eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)", LOSS_TESTS),
    ("ipo-sign", "loss.py", "r_l / rejected_n_tokens - 1 / (2 * beta)) ** 2",
     "r_l / rejected_n_tokens + 1 / (2 * beta)) ** 2", LOSS_TESTS),
    ("hinge-sign", "extras/losses.py", "torch.relu(1 - beta * h)", "torch.relu(1 + beta * h)",
     LOSS_TESTS),
    ("norm-sign", "extras/losses.py",
     "-F.logsigmoid(beta * (r_w / chosen_n_tokens - r_l / rejected_n_tokens))",
     "-F.logsigmoid(beta * (r_l / rejected_n_tokens - r_w / chosen_n_tokens))", LOSS_TESTS),
    ("dpop-sign", "extras/losses.py", "h - dpop_lambda * torch.relu(-r_w)",
     "h + dpop_lambda * torch.relu(-r_w)", LOSS_TESTS),
    ("simpo-sign", "extras/losses.py", "margin = beta * (avg_w - avg_l) - simpo_gamma",
     "margin = beta * (avg_w - avg_l) + simpo_gamma", LOSS_TESTS),
    ("rdpo-sign", "extras/losses.py",
     "beta * h + rdpo_alpha * (chosen_n_tokens - rejected_n_tokens)",
     "beta * h - rdpo_alpha * (chosen_n_tokens - rejected_n_tokens)", LOSS_TESTS),
    ("bco-sign", "extras/losses.py", "- F.logsigmoid(-(beta * r_l - bco_delta))",
     "- F.logsigmoid(beta * r_l - bco_delta)", LOSS_TESTS),
    ("nca-sign", "extras/losses.py", "- 0.5 * F.logsigmoid(-beta * r_l))",
     "- 0.5 * F.logsigmoid(beta * r_l))", LOSS_TESTS),
    ("apo-sign", "extras/losses.py", "(1 - torch.sigmoid(beta * r_w)) + torch.sigmoid(beta * r_l)",
     "(1 - torch.sigmoid(beta * r_w)) - torch.sigmoid(beta * r_l)", LOSS_TESTS),
    ("sppo-sign", "extras/losses.py", "(r_l + 1 / (2 * beta)) ** 2", "(r_l - 1 / (2 * beta)) ** 2",
     LOSS_TESTS),
    ("orpo-sign", "extras/losses.py", "losses = -avg_w - beta * F.logsigmoid(log_odds)",
     "losses = -avg_w + beta * F.logsigmoid(log_odds)", LOSS_TESTS),
    ("mask-shifted", "loss.py", "targets = loss_mask[:, 1:].bool()",
     "targets = loss_mask[:, :-1].bool()",
     ["tests/test_loss.py", "tests/test_train.py", "-k", "logps or nll"]),
    ("reference-dropped", "loss.py",
     "        logps.chosen, logps.rejected, ref.chosen, ref.rejected,",
     "        logps.chosen, logps.rejected, 0 * ref.chosen, 0 * ref.rejected,",
     ["tests/test_train.py", "tests/test_flags.py", "-k", "torchrun or away_from_step_zero"]),
    ("sft-alpha-ignored", "loss.py",
     "loss = pair_losses.mean() + sft_alpha * nll + aux_loss",
     "loss = pair_losses.mean() + aux_loss",
     FLAG_TESTS),
    ("label-smoothing-ignored", "train_dpo.py", "label_smoothing=args.label_smoothing,",
     "label_smoothing=0.0,", FLAG_TESTS),
    ("beta-ignored", "train_dpo.py", "loss_fn = functools.partial(dpo_loss, beta=args.beta,",
     "loss_fn = functools.partial(dpo_loss, beta=2.0,", FLAG_TESTS),
    ("unscale-skipped", "train_sft.py", "        scaler.unscale_(optimizer)\n",
     "        pass  # no unscale\n", ["tests/test_train.py", "-k", "float16 or skipped"]),
    ("no-sync-on-last", "train_dpo.py",
     "sync = nullcontext() if last or dist_info.world_size == 1 else model.no_sync()",
     "sync = nullcontext() if dist_info.world_size == 1 else model.no_sync()", DDP_TESTS),
    ("rank-offset-dropped", "data.py", "start = (k * world_size + rank) * micro",
     "start = (k * world_size) * micro", ["tests/test_data.py", *DDP_TESTS]),
    ("sft-mask-covers-prompt", "data.py", "mask += [0] * len(head) + prefix_mask + [on] * "
     "len(body)", "mask += [0] * len(head) + prefix_mask + [1] * len(body)",
     ["tests/test_data.py", "tests/test_train.py", "-k", "mask or nll or chat"]),
]


def copy_tree(tree, dest):
    """The tree's files without .git, out/ and caches."""
    ignore = shutil.ignore_patterns(".git", "out", "__pycache__", ".pytest_cache", "*.pyc")
    shutil.copytree(tree, dest, ignore=ignore)


def run_mutant(tree, name, path, code, mutated, tests):
    """(outcome, detail, seconds) of one mutant in a fresh copy of tree."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "tree")
        copy_tree(tree, copy)
        with open(os.path.join(copy, path), encoding="utf-8") as f:
            text = f.read()
        if text.count(code) < 1:
            return "not applicable", f"code not found in {path}", 0.0
        with open(os.path.join(copy, path), "w", encoding="utf-8") as f:
            f.write(text.replace(code, mutated, 1))
        t0 = time.time()
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p",
                                 "no:cacheprovider", "-rf", *tests], cwd=copy,
                                capture_output=True, text=True, timeout=1800)
        seconds = time.time() - t0
    failed = [line.split()[1] for line in result.stdout.splitlines()
              if line.startswith("FAILED ")]
    if result.returncode == 1:
        return "killed", failed[0] if failed else "(a failure)", seconds
    if result.returncode == 5:
        return "SURVIVED", "no such test in this tree", seconds
    if result.returncode == 0:
        return "SURVIVED", "every test passed", seconds
    return "error", f"pytest exit {result.returncode}: {result.stdout[-300:]}", seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", default=HERE, help="the checkout to mutate (default: this)")
    parser.add_argument("--only", nargs="+", default=None, help="mutant names (default: all)")
    args = parser.parse_args()
    rows = [m for m in MUTANTS if args.only is None or m[0] in args.only]
    print(f"mutants of {os.path.abspath(args.tree)}\n")
    print("| mutant | file | outcome | killed by | s |\n|---|---|---|---|---:|")
    killed = 0
    for name, path, code, mutated, tests in rows:
        outcome, detail, seconds = run_mutant(args.tree, name, path, code, mutated, tests)
        killed += outcome == "killed"
        print(f"| {name} | {path} | {outcome} | {detail} | {seconds:.0f} |", flush=True)
    print(f"\n{killed} of {len(rows)} mutants killed")


if __name__ == "__main__":
    main()
