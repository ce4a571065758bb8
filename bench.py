"""Time the DPO (and SFT) training step in one process and print a table.

Each mode runs in a fresh subprocess (so peak memory is its own), builds the same
model and data, warms up, then times --steps optimizer steps of the real training
code (loss.py, model.py, train_dpo.py). Rows:

  naive       MiniMind-style: every sequence padded to --max-len, full-vocab
              log_softmax over every position, reference forward every step
  default     train_dpo.py's path: dynamic padding, head on response positions only,
              reference forward every step
  chunked     default with --chunked-head (loss.ChunkedTokenLogps: no (N, V) logits)
  precompute  the same with --precompute-ref: no reference forward in the step
  bf16        default + bfloat16 autocast
  compile     precomputed reference + torch.compile (fp32)
  best        the best combination measured on 2 CPU cores: bfloat16 + precomputed
              reference (torch.compile did not pay here, see the compile row)
  sft         the SFT step (token-mean cross-entropy) on the chosen conversations

Run:  python bench.py                          (the issue's shape: ~5M params, pairs of
                                                ~58 prompt + ~150 response tokens, batch 8)
      python bench.py --data data/pairs_train.jsonl --preset tiny --batch-size 16
      python bench.py --modes naive default --steps 10
"""

import argparse
import copy
import itertools
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import data
import tokenizer
import training
from loss import ChosenRejected, concatenated_logps, dpo_loss, response_logps
from model import (Transformer, add_model_args, config_from_args, configure_optimizer,
                   optimizer_step)
from train_dpo import reference_table

MODES = {  # name: (pad to max_len, reference forward per step, dtype, compile, chunked head)
    "naive": (True, True, "float32", False, False),
    "default": (False, True, "float32", False, False),
    "chunked": (False, True, "float32", False, True),
    "precompute": (False, False, "float32", False, False),
    "bf16": (False, True, "bfloat16", False, False),
    "compile": (False, False, "float32", True, False),
    "best": (False, False, "bfloat16", False, False),
    "sft": (False, False, "float32", False, False),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                        help="which rows to run")
    parser.add_argument("--data", default=None,
                        help="preference file (with --tokenizer); default: synthetic pairs")
    parser.add_argument("--tokenizer", default=tokenizer.DEFAULT_TOKENIZER, help=".tiktoken file")
    parser.add_argument("--vocab-size", type=int, default=6400,
                        help="vocabulary of the synthetic pairs (ignored with --data)")
    parser.add_argument("--prompt-len", type=int, default=58, help="synthetic mean prompt len")
    parser.add_argument("--response-len", type=int, default=150,
                        help="synthetic mean response length")
    parser.add_argument("--pairs", type=int, default=512, help="synthetic pairs to draw from")
    parser.add_argument("--max-len", type=int, default=256, help="longest sequence")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    parser.add_argument("--peak-shapes", default="model", choices=sorted(PEAK_SHAPES),
                        help="matmul shapes for the peak measurement")
    parser.add_argument("--run-mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    add_model_args(parser)
    parser.set_defaults(preset="tiny", dim=256, n_layers=4, n_heads=8, n_kv_heads=4,
                        ffn_dim=832)
    return parser.parse_args(argv)


def synthetic_pairs(args):
    """Random-token pairs: prompt ~ U(0.7, 1.3) x prompt-len, responses likewise, cut to
    --max-len; ids avoid the last 3 (special) ids."""
    g = random.Random(0)

    def tokens(mean):
        return [g.randrange(args.vocab_size - 3) for _ in range(int(mean * g.uniform(0.7, 1.3)))]

    items = []
    for _ in range(args.pairs):
        prompt = tokens(args.prompt_len)
        chosen = tokens(args.response_len)[:args.max_len - len(prompt)]
        rejected = tokens(args.response_len)[:args.max_len - len(prompt)]
        items.append({"prompt": prompt, "chosen": chosen, "chosen_mask": [1] * len(chosen),
                      "rejected": rejected, "rejected_mask": [1] * len(rejected)})
    return items, args.vocab_size - 3


class Pairs(list):
    """Tokenised pairs with what train_dpo.reference_table expects of a data set."""

    def __init__(self, items, pad_id):
        super().__init__(items)
        self.pad_id = pad_id

    def lengths(self):
        return [data.pair_length(x) for x in self]


ONE_PROCESS = training.Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def pad_to(ids, mask, length, pad_id):
    """Pad a collated batch to a fixed length (the naive mode)."""
    extra = length - ids.shape[1]
    return F.pad(ids, (0, extra), value=pad_id), F.pad(mask, (0, extra))


def naive_logps(model, ids, mask):
    """MiniMind-style: logits at every position, a full log_softmax, then gather."""
    logits = model(ids)  # (2B, T, V)
    log_probs = F.log_softmax(logits.float(), dim=-1)  # (2B, T, V): a second full tensor
    token_logps = torch.gather(log_probs[:, :-1], -1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    logps = (token_logps * mask[:, 1:]).sum(-1)  # (2B,)
    return ChosenRejected(*logps.chunk(2))  # rows 0..B-1 chosen, B..2B-1 rejected


def policy_flops_per_token(config, context):
    """Forward matmul FLOPs per token (2 per multiply-add) without the output head, with
    causal attention over `context` earlier tokens on average."""
    head_dim = config.dim // config.n_heads
    qkv = config.dim * (config.dim + 2 * config.n_kv_heads * head_dim)
    per_layer = 2 * (qkv + config.dim * config.dim + 3 * config.dim * config.ffn_dim)
    per_layer += 2 * 2 * context * config.dim  # q.k and attention-weighted v
    return config.n_layers * per_layer


PEAK_SHAPES = {  # (M, K, N) of torch.mm: tokens x width x outputs, like the model's matmuls
    "model": [(2048, 256, 1664), (2048, 256, 6400), (2048, 832, 256), (1024, 1024, 1024)],
    "small": [(128, 64, 64)],  # for a quick smoke run
}


def matmul_peak(dtype, shapes):
    """Best GFLOP/s of torch.mm over `shapes`, in this process."""
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(3):
            a @ b
        t = time.perf_counter()
        reps = 10
        for _ in range(reps):
            a @ b
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9)
    return best


def run_mode(args):
    """One row: build, warm up, time; write the figures as JSON to args.result."""
    if args.threads:
        torch.set_num_threads(args.threads)
    pad_to_max, ref_forward, dtype, compile_model, chunked = MODES[args.run_mode]
    torch.manual_seed(0)
    if args.data:
        enc = tokenizer.load_tokenizer(args.tokenizer)
        items = data.PreferenceDataset(args.data, enc, args.max_len, args.max_len // 2,
                                       log=None).items
        vocab, pad_id = enc.n_vocab, enc.n_vocab - 3
    else:
        items, pad_id = synthetic_pairs(args)
        vocab = args.vocab_size
    config = config_from_args(args, vocab)
    model = Transformer(config)
    reference = Transformer(config).eval().requires_grad_(False) if ref_forward else None
    if reference is not None:
        reference.load_state_dict(model.state_dict())
    step_model = torch.compile(model, dynamic=True) if compile_model else model
    optimizer = configure_optimizer(model, 1e-5, 0.1)
    scaler = training.make_scaler(torch.device("cpu"), dtype)
    ctx = training.autocast(torch.device("cpu"), dtype)
    # The batch order train_dpo.py uses: length-grouped, except in the naive mode, which
    # pads everything to --max-len anyway.
    lengths = Pairs(items, pad_id).lengths()

    def batch_stream():
        for epoch in itertools.count():
            yield from data.epoch_batches(lengths, args.batch_size, seed=0, epoch=epoch,
                                          group_by_length=not pad_to_max)

    batch_order = batch_stream()
    ref_table = None
    if not ref_forward and args.run_mode != "sft":  # --precompute-ref: before the clock starts
        pairs = Pairs(items, pad_id)
        with torch.no_grad():
            ref_table = reference_table(copy.deepcopy(model).eval(), pairs,
                                        2 * args.batch_size, ctx, ONE_PROCESS)
    counts = {"pairs": 0, "tokens": 0, "padded": 0, "useful_flops": 0.0}

    def step(timed):
        idx = next(batch_order)
        batch = [items[i] for i in idx]
        if args.run_mode == "sft":
            ids, mask = data.collate_sft([(x["prompt"] + x["chosen"],
                                           [0] * len(x["prompt"]) + x["chosen_mask"])
                                          for x in batch], pad_id)
            with ctx:
                logps, n = response_logps(step_model, ids, mask)
            (-logps.sum() / n.sum()).backward()
            optimizer_step(model, optimizer, scaler, 1.0)
            lengths = [len(x["prompt"]) + len(x["chosen"]) for x in batch]
            width, n_seq = ids.shape[1], len(batch)
        else:
            ids, mask = data.collate_pairs(batch, pad_id)
            if pad_to_max:
                ids, mask = pad_to(ids, mask, args.max_len, pad_id)
            with ctx:
                if pad_to_max:
                    policy = naive_logps(step_model, ids, mask)
                    n_tok = ChosenRejected(*mask[:, 1:].sum(-1).float().chunk(2))
                else:
                    policy, n_tok = concatenated_logps(step_model, ids, mask, chunked)
                if reference is not None:
                    with torch.no_grad():
                        ref = (naive_logps(reference, ids, mask) if pad_to_max else
                               concatenated_logps(reference, ids, mask, chunked)[0])
                else:
                    rows = ref_table[idx]
                    ref = ChosenRejected(chosen=rows[:, 0], rejected=rows[:, 1])
            losses, _, _ = dpo_loss(policy.chosen, policy.rejected, ref.chosen, ref.rejected,
                                    beta=args.beta, chosen_n_tokens=n_tok.chosen,
                                    rejected_n_tokens=n_tok.rejected)
            scaler.scale(losses.mean()).backward()
            optimizer_step(model, optimizer, scaler, 1.0)
            lengths = ([len(x["prompt"]) + len(x["chosen"]) for x in batch]
                       + [len(x["prompt"]) + len(x["rejected"]) for x in batch])
            width, n_seq = ids.shape[1], 2 * len(batch)
        if timed:
            counts["pairs"] += len(batch)
            counts["tokens"] += sum(lengths)
            counts["padded"] += width * n_seq
            targets = sum(lengths) - n_seq  # response + (for SFT) every next token
            if args.run_mode != "sft":
                targets = sum(len(x["chosen"]) + len(x["rejected"]) for x in batch)
            counts["useful_flops"] += 3 * (
                sum(policy_flops_per_token(config, L / 2) * L for L in lengths)
                + 2 * config.dim * config.vocab_size * targets)

    for _ in range(args.warmup):
        step(False)
    t = time.perf_counter()
    for _ in range(args.steps):
        step(True)
    elapsed = time.perf_counter() - t
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB on Linux
    result = {"mode": args.run_mode, "pairs_per_s": counts["pairs"] / elapsed,
              "tokens_per_s": counts["tokens"] / elapsed,
              "padding": 1 - counts["tokens"] / counts["padded"],
              "peak_mib": peak_rss, "gflops": counts["useful_flops"] / elapsed / 1e9,
              "flops_per_pair": counts["useful_flops"] / counts["pairs"],
              "tokens_per_pair": counts["tokens"] / counts["pairs"],
              "params": model.num_params(), "threads": torch.get_num_threads()}
    with open(args.result, "w") as f:
        json.dump(result, f)


def main():
    args = parse_args()
    if args.run_mode:
        return run_mode(args)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    peak32 = matmul_peak(torch.float32, PEAK_SHAPES[args.peak_shapes])
    peak16 = matmul_peak(torch.bfloat16, PEAK_SHAPES[args.peak_shapes])
    print(f"matmul peak in this process ({threads} threads): fp32 {peak32:.0f} GFLOP/s, "
          f"bf16 {peak16:.0f} GFLOP/s")
    rows = []
    forwarded = [a for a in sys.argv[1:]]
    for mode in args.modes:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        cmd = [sys.executable, os.path.abspath(__file__), *forwarded, "--run-mode", mode,
               "--result", path, "--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{mode}: failed\n{proc.stderr[-2000:]}")
            continue
        with open(path) as f:
            rows.append(json.load(f))
        os.remove(path)
        r = rows[-1]
        print(f"  {mode}: {r['pairs_per_s']:.2f} pairs/s", flush=True)
    if not rows:
        return
    r0 = rows[0]
    print(f"\nmodel {r0['params']:,} parameters; {r0['tokens_per_pair']:.0f} tokens a pair "
          f"(non-pad); batch {args.batch_size}; {args.steps} timed steps after "
          f"{args.warmup} warm-up; useful = policy fwd+bwd FLOPs on non-pad tokens\n")
    base = next((r["pairs_per_s"] for r in rows if r["mode"] == "naive"), None)
    print(f"{'mode':<11}{'pairs/s':>9}{'x naive':>9}{'tokens/s':>10}{'padding':>9}"
          f"{'peak MiB':>10}{'MiB/pair':>10}{'GFLOP/pair':>11}{'GFLOP/s':>9}{'MFU':>7}")
    for r in rows:
        peak = peak16 if MODES[r["mode"]][2] == "bfloat16" else peak32
        speedup = f"{r['pairs_per_s'] / base:.2f}" if base else "-"
        print(f"{r['mode']:<11}{r['pairs_per_s']:>9.2f}{speedup:>9}{r['tokens_per_s']:>10.0f}"
              f"{r['padding']:>9.1%}{r['peak_mib']:>10.0f}"
              f"{r['peak_mib'] / args.batch_size:>10.1f}{r['flops_per_pair'] / 1e9:>11.2f}"
              f"{r['gflops']:>9.1f}{r['gflops'] / peak:>7.1%}")
    print("\nMFU = useful GFLOP/s / same-process matmul peak (bf16 peak for bf16 rows).")


if __name__ == "__main__":
    main()
