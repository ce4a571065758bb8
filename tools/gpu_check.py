"""Time train_dpo.py itself on a GPU at MiniMind's shapes, in bfloat16, next to the naive
(MiniMind-style) trainer on the same device; print tokens/s, pairs/s, MFU and peak
memory. Part of `bash scripts/gpu_check.sh`; alone: `python -m tools.gpu_check`.

Each row is one fresh process that logs every step (`--log-every 1`: each record follows
the step's host read, which waits for the GPU; the naive trainer synchronizes after each
step). The first --warmup steps (CUDA context, allocator, cuBLAS heuristics) are left
out; the window is every step after them, until it holds --seconds of training, then
the process is stopped. No row compiles, so no step of the window waits for a compile.

Tokens a pair are counted as each row computes them, averaged over the data set: the
concatenated forward runs 2P + C + R (the prompt once with each answer), --packed
P + C + R (the prompt once); the naive trainer pads every row to --max-len (the data's
longest row), so its padding share is printed and its MFU counts useful tokens only.
MFU = 8 N x tokens/s / the GPU's bf16 dense peak: the policy's forward and backward
(6 N a token) and the reference's forward (2 N), N the parameters (the tied embedding
once: it is the output head's matmul). Attention's score and value FLOPs (~4 T C a
token a layer, T the row length) are left out of every row, so MFU is a little low.
"""

import json
import os
import subprocess
import sys
import time

import torch

import data
import tokenizer
from tools import bench
from errors import ArgumentParser, UserError, run_main
from model import Transformer, make_config

# bf16 dense tensor-core peak, FLOP/s, by a piece of the device name (NVIDIA data sheets)
PEAK_BF16 = [("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12),
             ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
             ("A10", 125e12), ("4090", 165e12), ("3090", 71e12), ("V100", 125e12)]
PRESETS = ("minimind", "minimind-768")
ROWS = {  # name: (command, extra flags, tokens a pair counts the prompt twice)
    "bf16": (["train_dpo.py"], ["--dtype", "bfloat16"], True),
    "packed-bf16": (["train_dpo.py"], ["--dtype", "bfloat16", "--packed"], False),
    "naive fp32": (["-m", "tools.bench", "naive"], [], True),
}


def peak_flops(name):
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def pair_tokens(pairs_path, tok_path):
    """(mean 2P + C + R, mean P + C + R, the longest row P + max(C, R)) over the pairs."""
    ds = data.PreferenceDataset(pairs_path, tokenizer.load_tokenizer(tok_path), 4096, 2048,
                                log=None)
    P, C, R = ([len(x[k]) for x in ds.items] for k in ("prompt", "chosen", "rejected"))
    n = len(P)
    return ((2 * sum(P) + sum(C) + sum(R)) / n, (sum(P) + sum(C) + sum(R)) / n,
            max(p + max(c, r) for p, c, r in zip(P, C, R)))


def read_records(path):
    """The whole records of a metrics.jsonl being written (a last partial line skipped)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")[:-1]  # the part after the last newline may be partial
    return [json.loads(line) for line in lines if line.strip()]


def window(records, warmup, batch_size):
    """(steps, seconds) after the first warmup steps: each record's elapsed time is
    pairs seen / pairs_per_s (cumulative), so the window is its difference."""
    elapsed = {r["step"]: r["step"] * batch_size / r["pairs_per_s"] for r in records}
    if warmup not in elapsed or max(elapsed) <= warmup:
        return 0, 0.0
    last = max(elapsed)
    return last - warmup, elapsed[last] - elapsed[warmup]


def time_row(cmd, out_dir, args):
    """Run cmd until its window after warm-up holds args.seconds (then stop it), or until
    args.row_limit seconds. Returns (steps, seconds) of the window."""
    metrics = os.path.join(out_dir, "dpo", "metrics.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    with open(os.path.join(out_dir, "log.txt"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=bench.HERE)
        t0 = time.time()
        while proc.poll() is None and time.time() - t0 < args.row_limit:
            time.sleep(0.5)
            if window(read_records(metrics), args.warmup, args.batch_size)[1] >= args.seconds:
                break
        if proc.poll() is None:
            proc.terminate()  # SIGTERM: the trainer ends with one line
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    records = read_records(metrics)
    if not records:
        raise UserError(f"{' '.join(cmd)} logged no step: {bench.last_line(log.name)} "
                        f"(the whole output: {log.name})")
    return window(records, args.warmup, args.batch_size), records[-1].get("peak_gpu_mib")


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per step")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out before timing")
    parser.add_argument("--seconds", type=float, default=6.0,
                        help="training time each row's window holds")
    parser.add_argument("--row-limit", type=float, default=28.0,
                        help="a row's process is stopped after this many seconds anyway (6 "
                        "rows: under 3 minutes in all)")
    parser.add_argument("--work-dir", default=os.path.join("out", "gpu_check"),
                        help="synthetic data, the runs' output and each row's log.txt")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; nothing timed")
        return
    name = torch.cuda.get_device_name(0)
    peak = peak_flops(name)
    work = os.path.abspath(args.work_dir)
    pairs, tok = bench.write_synthetic(work, 2000)
    twice, once, max_len = pair_tokens(pairs, tok)
    common = ["--sft-ckpt", "", "--data", pairs, "--tokenizer", tok, "--val-data", "",
              "--samples", "0", "--quiet", "--no-save", "--beta", "0.1", "--device", "cuda",
              "--batch-size", str(args.batch_size), "--max-len", str(max_len),
              "--max-prompt-len", str(max_len), "--eval-every", "0", "--log-every", "1",
              "--steps", "1000000"]
    rows = []
    for preset in PRESETS:
        n_params = Transformer(make_config(preset, vocab_size=6400)).num_params()
        for row, (cmd, extra, prompt_twice) in ROWS.items():
            out = os.path.join(work, f"{preset}-{row.replace(' ', '-')}")
            os.makedirs(out, exist_ok=True)
            try:
                (steps, seconds), peak_mib = time_row(
                    [sys.executable, *cmd, *common, "--preset", preset, "--out-dir", out,
                     *extra], out, args)
            except UserError as e:
                print(f"{preset} {row}: failed: {e}", flush=True)
                rows.append((preset, row, None, None, None, None, 0, 0.0))
                continue
            pairs_s = steps * args.batch_size / seconds if seconds else None
            tokens_s = pairs_s * (twice if prompt_twice else once) if pairs_s else None
            mfu = 8 * n_params * tokens_s / peak if tokens_s and peak else None
            rows.append((preset, row, pairs_s, tokens_s, mfu, peak_mib, steps, seconds))
            print(f"{preset} {row}: {steps} steps in {seconds:.2f} s after {args.warmup} "
                  f"warm-up steps", flush=True)
    print(f"\n{name}, torch {torch.__version__}; batch {args.batch_size} pairs, rows up to "
          f"{max_len} tokens (the data's longest); tokens a pair {twice:.0f} (2P+C+R), "
          f"packed {once:.0f} (P+C+R); the naive trainer pads to {max_len}: "
          f"{1 - twice / (2 * max_len):.0%} of its tokens are padding; "
          + (f"bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else "bf16 peak unknown (no MFU)"))
    print("| preset | row | pairs/s | tokens/s | MFU | peak GPU MiB | window |")
    print("|---|---|---:|---:|---:|---:|---|")
    for preset, row, pairs_s, tokens_s, mfu, peak_mib, steps, seconds in rows:
        short = " (under 5 s)" if seconds < 5 else ""
        print(f"| {preset} | {row} | {cell(pairs_s, '.1f')} | {cell(tokens_s, ',.0f')} | "
              f"{cell(mfu, '.1%')} | {cell(peak_mib, ',.0f')} | {steps} steps, "
              f"{seconds:.1f} s{short} |")


def cell(value, spec):
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    run_main(main)
