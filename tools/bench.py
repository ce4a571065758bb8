"""Time train_dpo.py as users run it, next to a MiniMind-style naive trainer; print a table.

Every row is two fresh processes of the real script, for --k1 and for --k2 optimizer
steps: pairs/s = (k2 - k1) x pairs per step / the difference in wall time, so the
start-up (imports, tokenising, building the model) cancels. Peak memory is the
largest resident set of the longer run (all its processes under torchrun, each
counted on its own: the largest one). Runs go one after another, never two at once.

Data sets, each with the real length distribution of its pairs:
  tinychat   data/pairs_train.jsonl, the `tiny` preset, batch 8, max length 256
  synthetic  2,000 English-word pairs written by this script (prompts of 30-50
             words, responses of 60-120), MiniMind's tokenizer (6,400 words,
             tests/fixtures/minimind), width 256, 4 layers, 8/4 heads, FFN 832, max
             length 256, batch 8, beta 0.1: the shape of MiniMind's small models
Rows:
  naive        `tools/bench.py naive`: MiniMind's DPO step (trainer/train_dpo.py) on our
               model and data: every sequence padded to the max length, a
               full-vocabulary log_softmax at every position for policy and
               reference, torch.optim.AdamW with its defaults, clip 1.0, fp32
  default      `train_dpo.py` (fp32)
  packed       `train_dpo.py --packed`: one prompt copy per pair, no padding in the matmuls
  packed-chunked  `--packed --chunked-head`: nor an (N, V) logits tensor (less memory)
  bf16         `train_dpo.py --dtype bfloat16`
  packed-bf16  `train_dpo.py --packed --dtype bfloat16`
  minimind     MiniMind's own trainer/train_dpo.py, from a MiniMind checkout given by
               --minimind (synthetic set only: MiniMind reads its own tokenizer), on the
               first k x batch synthetic pairs in its format, in one process, fp32 (its
               CPU default), MiniMind's defaults otherwise (8 data-loader workers),
               random weights (--from_weight none); it writes
               checkpoints/bench_dpo_256*.pth in that checkout
Every row runs the reference forward each step and no gradient accumulation.

Run:  python -m tools.bench                                  (both sets, every row, 1 process)
      python -m tools.bench --sets tinychat --rows default bf16 --nproc 2
      python -m tools.bench --repeat 3 --k1 5 --k2 25        (readings interleaved by round)
      python -m tools.bench --sets synthetic --minimind ~/minimind --minimind-python ~/mm/bin/python
"""

import argparse
import copy
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import checkpoint
import data
import devices
import tokenizer
import flags
import train_dpo
from errors import ArgumentParser, UserError, run_main

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
MINIMIND_TOKENIZER = os.path.join(HERE, "tests", "fixtures", "minimind", "tokenizer.json")

ROWS = {  # name: flags of train_dpo.py (None: another trainer)
    "minimind": None,  # MiniMind's own, with --minimind
    "naive": None,  # the naive trainer in this file
    "default": [],
    "packed": ["--packed"],
    "packed-chunked": ["--packed", "--chunked-head"],
    "bf16": ["--dtype", "bfloat16"],
    "packed-bf16": ["--packed", "--dtype", "bfloat16"],
}
# float32 unless the row says bf16 (--dtype auto would take bf16 on a CPU with bf16
# instructions)
TIMING = ["--sft-ckpt", "", "--val-data", "", "--no-save", "--samples", "0", "--quiet",
          "--dtype", "float32"]
SHAPE = ["--dim", "256", "--n-layers", "4", "--n-heads", "8", "--n-kv-heads", "4",
         "--ffn-dim", "832"]
# MiniMind's trainer at SHAPE: MiniMindConfig's defaults give the heads (8/4), the FFN
# (ceil(256 pi / 64) x 64 = 832) and the 6,400-word vocabulary
MINIMIND_SHAPE = ["--hidden_size", "256", "--num_hidden_layers", "4", "--max_seq_len", "256"]


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=["tinychat", "synthetic"],
                        choices=["tinychat", "synthetic"], help="data sets to time on")
    parser.add_argument("--rows", nargs="+", default=None, choices=list(ROWS),
                        help="what to time (default: every row; minimind with --minimind)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes per run (> 1: torchrun --standalone; the naive "
                        "trainer runs in one process)")
    parser.add_argument("--k1", type=int, default=None,
                        help="steps of the short run (default: 20 on tinychat, 5 on synthetic)")
    parser.add_argument("--k2", type=int, default=None,
                        help="steps of the long run (default: 220 on tinychat, 25 on synthetic)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="pairs per step, the global batch (under --nproc N, each process "
                        "takes 1/N of it)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds; each round runs every row once, in order")
    parser.add_argument("--work-dir", default=os.path.join("out", "bench"),
                        help="synthetic data, its tokenizer and the runs' output")
    parser.add_argument("--pairs", type=int, default=2000, help="synthetic pairs")
    parser.add_argument("--json", default=None, help="also write every reading here")
    parser.add_argument("--minimind", default=None,
                        help="a checkout of MiniMind (github.com/jingyaogong/minimind): adds "
                        "the row of its own trainer")
    parser.add_argument("--minimind-python", default=sys.executable,
                        help="the Python that runs MiniMind (needs its requirements: "
                        "transformers, datasets, pandas)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="flags added to every train_dpo.py run (after the set's own)")
    args = parser.parse_args(argv)
    if args.rows is None:
        args.rows = [row for row in ROWS if row != "minimind" or args.minimind]
    if "minimind" in args.rows and not args.minimind:
        parser.error("the minimind row needs --minimind DIR (a MiniMind checkout)")
    return args

# ----------------------------------------------------------------------------
# The data sets


def write_synthetic(work_dir, n_pairs, seed=0):
    """n_pairs English-word pairs (a .jsonl in the TinyChat format) and MiniMind's tokenizer
    as .tiktoken; the words and their frequencies come from TinyChat's SFT texts.
    Returns (data path, tokenizer path)."""
    os.makedirs(work_dir, exist_ok=True)
    pairs_path = os.path.join(work_dir, f"synthetic_{n_pairs}_{seed}.jsonl")
    tok_path = os.path.join(work_dir, "minimind.tiktoken")
    if not os.path.exists(tok_path):
        tokenizer.convert_hf_tokenizer(MINIMIND_TOKENIZER, tok_path)
    if not os.path.exists(pairs_path):
        counts = {}
        for text in tokenizer.file_texts(os.path.join(data.DATA_DIR, "sft_train.jsonl")):
            for word in re.findall(r"[A-Za-z']+", text):
                counts[word] = counts.get(word, 0) + 1
        words, weights = list(counts), list(counts.values())
        g = random.Random(seed)

        def text(low, high):
            return " ".join(g.choices(words, weights, k=g.randint(low, high))) + "."

        lines = [json.dumps({"prompt": [{"role": "user", "content": text(30, 50)}],
                             "chosen": [{"role": "assistant", "content": text(60, 120)}],
                             "rejected": [{"role": "assistant", "content": text(60, 120)}]})
                 for _ in range(n_pairs)]
        with open(pairs_path + ".tmp", "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(pairs_path + ".tmp", pairs_path)
    return pairs_path, tok_path


STEPS = {"tinychat": (20, 220), "synthetic": (5, 25)}  # (k1, k2): ~20 s apart on 2 cores


def write_minimind_pairs(pairs_path, n):
    """The first n pairs of pairs_path in MiniMind's DPO format (chosen and rejected each
    the whole conversation); returns the new file's path (reused if it is there)."""
    path = f"{os.path.splitext(pairs_path)[0]}_minimind_{n}.jsonl"
    if os.path.exists(path):
        return path
    with open(pairs_path) as f:
        records = [json.loads(line) for line, _ in zip(f, range(n))]
    if len(records) < n:  # MiniMind's epoch would end early: fewer steps than timed
        raise UserError(f"the minimind row needs {n} pairs, --pairs is {len(records)}")
    with open(path + ".tmp", "w") as f:
        for r in records:
            f.write(json.dumps({"chosen": r["prompt"] + r["chosen"],
                                "rejected": r["prompt"] + r["rejected"]}) + "\n")
    os.replace(path + ".tmp", path)
    return path


def set_flags(name, args):
    """train_dpo.py flags of a data set (model shape, data, tokenizer)."""
    if name == "tinychat":
        return ["--preset", "tiny"]
    pairs_path, tok_path = write_synthetic(args.work_dir, args.pairs)
    return ["--data", pairs_path, "--tokenizer", tok_path, *SHAPE, "--beta", "0.1"]

# ----------------------------------------------------------------------------
# The naive trainer: MiniMind's DPO step on our model


def naive_main(argv):
    """`python -m tools.bench naive [train_dpo.py flags]`: what MiniMind's trainer/train_dpo.py
    does each step, on the data and model train_dpo.py would build from the same flags.
    One process, fp32, --steps steps, batches in random order; with --log-every 1 a
    record a step (steps and pairs/s, after a synchronize) in OUT_DIR/dpo/metrics.jsonl."""
    args = train_dpo.parse_args(argv)
    device = torch.device(devices.choose_device(args.device, False, 0, 1,
                                                 torch.cuda.device_count()))
    torch.manual_seed(args.seed)
    enc = tokenizer.load_tokenizer(args.tokenizer)
    train_ds = data.PreferenceDataset(args.data, enc, args.max_len, args.max_prompt_len,
                                      args.skip_invalid, log=None)
    model = checkpoint.dpo_model(args.sft_ckpt, tokenizer.tokenizer_identity(args.tokenizer),
                                 flags.config_from_args(args, enc.n_vocab))
    model.to(device)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)  # MiniMind's: defaults
    order = torch.randperm(len(train_ds)).tolist()
    metrics = checkpoint.MetricsLog(os.path.join(args.out_dir, "dpo", "metrics.jsonl"), True,
                                  False) if args.log_every == 1 else None
    t0 = time.time()
    for step in range(args.steps):
        idx = [order[(step * args.batch_size + j) % len(order)]  # epoch after epoch
               for j in range(args.batch_size)]
        ids, mask = data.collate_pairs([train_ds[i] for i in idx], train_ds.pad_id)
        # MiniMind's DPODataset pads every sequence to max_length, x = ids[:-1], y = ids[1:]
        ids = F.pad(ids, (0, args.max_len - ids.shape[1]), value=train_ds.pad_id)
        mask = F.pad(mask, (0, args.max_len - mask.shape[1]))
        ids, mask = ids.to(device), mask.to(device)
        x, y, mask = ids[:, :-1], ids[:, 1:], mask[:, 1:].float()  # (2B, T-1) each
        with torch.no_grad():
            ref_logits = reference(x)  # (2B, T-1, V): every position
        ref_logps = (log_probs_of(ref_logits, y) * mask).sum(-1)  # (2B,)
        logps = (log_probs_of(model(x), y) * mask).sum(-1)  # (2B,)
        B = len(idx)
        h = (logps[:B] - logps[B:]) - (ref_logps[:B] - ref_logps[B:])
        loss = -F.logsigmoid(args.beta * h).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if metrics is not None:  # --log-every 1 (tools/gpu_check.py): a record a step
            if device.type == "cuda":
                torch.cuda.synchronize()  # the step's time, not its launch's
            metrics.write({"step": step + 1, "pairs_per_s": (step + 1) * args.batch_size /
                           (time.time() - t0), **devices.gpu_memory(device)})
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.time() - t0
    print(f"done: {args.steps} steps in {elapsed:.1f}s; "
          f"{args.steps * args.batch_size / elapsed:.2f} pairs/s"
          + devices.peak_gpu_memory(device))


def log_probs_of(logits, labels):
    """MiniMind's logits_to_log_probs: a full log_softmax, then the labels' entries."""
    return torch.gather(F.log_softmax(logits, dim=2), 2, labels.unsqueeze(2)).squeeze(-1)

# ----------------------------------------------------------------------------
# Timing


def last_line(path):
    """The last non-empty line of a log: where a failed run says what went wrong."""
    with open(path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else "(no output)"


def run_once(cmd, cwd, log_path):
    """Run cmd to the end; (wall seconds, peak RSS in MiB of its largest process)."""
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise UserError(f"{' '.join(cmd)} failed (exit {code}): {last_line(log_path)} "
                        f"(the whole output: {log_path})")
    return wall, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def command(row, set_args, steps, args, out_dir):
    """(command line, folder to run it in) of one timed run."""
    if row == "minimind":  # one epoch over the first steps x batch pairs, as MiniMind runs
        pairs = write_minimind_pairs(write_synthetic(args.work_dir, args.pairs)[0],
                                     steps * args.batch_size)
        return [args.minimind_python, "train_dpo.py", *MINIMIND_SHAPE, "--batch_size",
                str(args.batch_size), "--beta", "0.1", "--from_weight", "none", "--data_path",
                pairs, "--save_dir", out_dir, "--save_weight", "bench_dpo"], os.path.join(
                    args.minimind, "trainer")
    flags = [*TIMING, *set_args, "--steps", str(steps), "--batch-size", str(args.batch_size),
             "--out-dir", out_dir, *args.extra]
    if ROWS[row] is None:
        return [sys.executable, "-m", "tools.bench", "naive", *flags], HERE
    flags += ROWS[row]
    if args.nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={args.nproc}", "train_dpo.py", *flags], HERE
    return [sys.executable, "train_dpo.py", *flags], HERE


def rows_of(name, args):
    """The rows that run on data set `name`: MiniMind's trainer reads only its own tokenizer,
    so it runs on the synthetic set only."""
    return [row for row in args.rows if row != "minimind" or name == "synthetic"]


def time_row(row, set_args, k1, k2, args, out_dir):
    """pairs/s from a k1-step and a k2-step run, and the longer run's peak MiB. Under
    --compile an untimed k1-step run goes first: both timed runs then find the compiled
    graphs cached (else the first pays a cold compile the second does not, and their
    difference is no longer the steps' time)."""
    os.makedirs(out_dir, exist_ok=True)
    log = os.path.join(out_dir, "log.txt")
    short = command(row, set_args, k1, args, out_dir)
    if "--compile" in short[0]:
        run_once(*short, log)
    t1, _ = run_once(*short, log)
    t2, peak = run_once(*command(row, set_args, k2, args, out_dir), log)
    return (k2 - k1) * args.batch_size / (t2 - t1), peak


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["naive"]:
        return naive_main(argv[1:])
    args = parse_args(argv)
    args.work_dir = os.path.abspath(args.work_dir)  # the runs start in other folders
    args.minimind = args.minimind and os.path.abspath(args.minimind)
    readings = {}  # (set, row) -> [(pairs/s, peak MiB)]
    steps = {name: (args.k1 or STEPS[name][0], args.k2 or STEPS[name][1]) for name in args.sets}
    for name in args.sets:
        set_args = set_flags(name, args)
        k1, k2 = steps[name]
        for round_ in range(args.repeat):
            for row in rows_of(name, args):
                out_dir = os.path.join(args.work_dir, "runs", f"{name}-{row}")
                speed, peak = time_row(row, set_args, k1, k2, args, out_dir)
                readings.setdefault((name, row), []).append((speed, peak))
                print(f"{name:<10} {row:<12} round {round_ + 1}: {speed:6.2f} pairs/s, "
                      f"peak {peak:,.0f} MiB", flush=True)
    threads = (f"{torch.get_num_threads()} threads" if args.nproc == 1
               else "torchrun's 1 thread each")
    print(f"\n{args.nproc} process(es) a run, {threads}, steps "
          + ", ".join(f"{n} {k1} vs {k2}" for n, (k1, k2) in steps.items())
          + "; fp32 unless the row says bf16\n")
    bases = [row for row in ("minimind", "naive") if row in args.rows]  # compared against
    print("| data | row | pairs/s (median) | each reading | peak MiB |"
          + "".join(f" x {base} | of {base}'s MiB |" for base in bases))
    print("|---|---|---:|---|---:|" + "---:|---:|" * len(bases))
    for name in args.sets:
        summary = {row: (statistics.median([s for s, _ in readings[(name, row)]]),
                         max(p for _, p in readings[(name, row)])) for row in rows_of(name, args)}
        for row, (speed, peak) in summary.items():
            cells = [f"{speed:.2f}", ", ".join(f"{s:.2f}" for s, _ in readings[(name, row)]),
                     f"{peak:,.0f}"]
            for base in bases:
                base_speed, base_peak = summary.get(base, (None, None))
                cells += ([f"{speed / base_speed:.2f}", f"{peak / base_peak:.0%}"]
                          if base_speed else ["-", "-"])
            print(f"| {name} | {row} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"set": s, "row": r, "pairs_per_s": v, "peak_mib": p}
                       for (s, r), values in readings.items() for v, p in values], f, indent=1)


if __name__ == "__main__":
    run_main(main)
