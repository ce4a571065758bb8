"""Time train_dpo.py itself on a GPU at MiniMind's shapes, in bfloat16, next to the naive
(MiniMind-style) trainer on the same device; print tokens/s, pairs/s, MFU and peak
memory. Part of `bash scripts/gpu_check.sh`; alone: `python -m tools.gpu_check`.

Each row is two fresh processes, K1 and K2 steps (bench.py's method: the start-up
cancels). MFU = model FLOPs a token x tokens/s / the GPU's bf16 dense peak, with a DPO
step's FLOPs a token = 8 N: the policy's forward and backward (6 N) and the reference's
forward (2 N), N the parameters (the tied embedding counted once: it is the output
head's matmul); attention's T-dependent FLOPs are left out, so MFU is slightly low.
Tokens are the chosen and rejected rows' real tokens (prompt counted in each), for the
naive trainer too, which pads every row to the maximum length: its MFU is useful work.
"""

import os
import re
import sys

import torch

from tools import bench
from errors import ArgumentParser, run_main
from model import Transformer, make_config

# bf16 dense tensor-core peak, FLOP/s, by a piece of the device name (NVIDIA data sheets)
PEAK_BF16 = [("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12),
             ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
             ("A10", 125e12), ("4090", 165e12), ("3090", 71e12), ("V100", 125e12)]
PRESETS = ("minimind", "minimind-768")


def peak_flops(name):
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def parse(log_path):
    """(tokens a pair, peak GPU MiB) from a train_dpo.py or bench.py naive log."""
    with open(log_path, errors="replace") as f:
        text = f.read()
    tokens = re.search(r"\(([\d.]+) tokens a pair\)", text)
    peak = re.search(r"peak GPU memory ([\d,]+) MiB", text)
    return (float(tokens.group(1)) if tokens else None,
            float(peak.group(1).replace(",", "")) if peak else None)


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per step")
    parser.add_argument("--max-len", type=int, default=512, help="longest pair row")
    parser.add_argument("--k1", type=int, default=5, help="steps of the short run")
    parser.add_argument("--k2", type=int, default=30, help="steps of the long run")
    parser.add_argument("--work-dir", default=os.path.join("out", "gpu_check"),
                        help="synthetic data and the runs' output")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; nothing timed")
        return
    name = torch.cuda.get_device_name(0)
    peak = peak_flops(name)
    work = os.path.abspath(args.work_dir)
    pairs, tok = bench.write_synthetic(work, 2000)
    common = ["--sft-ckpt", "", "--data", pairs, "--tokenizer", tok, "--val-data", "",
              "--samples", "0", "--quiet", "--no-save", "--beta", "0.1", "--device", "cuda",
              "--batch-size", str(args.batch_size), "--max-len", str(args.max_len),
              "--max-prompt-len", str(args.max_len // 2), "--eval-every", "0"]
    rows = []
    for preset in PRESETS:
        n_params = Transformer(make_config(preset, vocab_size=6400)).num_params()
        tokens_pair = None
        for row, cmd, extra in (
                ("bf16", [sys.executable, "train_dpo.py"], ["--dtype", "bfloat16"]),
                ("packed-bf16", [sys.executable, "train_dpo.py"],
                 ["--dtype", "bfloat16", "--packed"]),
                ("naive fp32", [sys.executable, "-m", "tools.bench", "naive"], [])):
            out = os.path.join(work, f"{preset}-{row.replace(' ', '-')}")
            os.makedirs(out, exist_ok=True)
            log = os.path.join(out, "log.txt")
            times = []
            for steps in (args.k1, args.k2):
                flags = [*common, "--preset", preset, "--steps", str(steps), "--out-dir", out,
                         *extra]
                times.append(bench.run_once([*cmd, *flags], bench.HERE, log)[0])
            pairs_s = (args.k2 - args.k1) * args.batch_size / (times[1] - times[0])
            found, peak_mib = parse(log)
            tokens_pair = found or tokens_pair  # the naive trainer: the same pairs
            tokens_s = pairs_s * tokens_pair if tokens_pair else None
            mfu = 8 * n_params * tokens_s / peak if tokens_s and peak else None
            rows.append((preset, row, pairs_s, tokens_s, mfu, peak_mib))
            print(f"{preset} {row}: {pairs_s:.1f} pairs/s", flush=True)
    print(f"\n{name}, torch {torch.__version__}; batch {args.batch_size}, max length "
          f"{args.max_len}, steps {args.k1} vs {args.k2}; bf16 peak "
          f"{peak / 1e12:.0f} TFLOP/s" if peak else f"\n{name}: bf16 peak unknown (no MFU)")
    print("| preset | row | pairs/s | tokens/s | MFU | peak GPU MiB |")
    print("|---|---|---:|---:|---:|---:|")
    for preset, row, pairs_s, tokens_s, mfu, peak_mib in rows:
        print(f"| {preset} | {row} | {pairs_s:.1f} | {cell(tokens_s, ',.0f')} | "
              f"{cell(mfu, '.1%')} | {cell(peak_mib, ',.0f')} |")


def cell(value, spec):
    return "-" if value is None else format(value, spec)

if __name__ == "__main__":
    run_main(main)
