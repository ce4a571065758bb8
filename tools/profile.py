"""Where a training step's time goes: train_dpo.py (or train_sft.py) itself under
torch.profiler, its op time sorted into kinds of work; print a table.

Each row runs the real script in a fresh process (`python -m tools.profile one ...`, under
torchrun with --nproc 2) with the profiler on: --warmup optimizer steps unrecorded, then
--steps recorded (an optimizer step hook advances the profiler). Every op's own (self)
time on the main thread goes to one kind of work, by the op and the ops or regions
it runs inside:
  matmul         aten::mm, addmm, bmm, baddbmm (the linear layers and the head)
  attention      the fused scaled-dot-product-attention kernel, forward and backward
  casts          dtype conversions (aten::to / _to_copy: what autocast adds)
  element-wise   every other op: norms, activations, RoPE, the head's cross-entropy,
                 gathers, adds, the loss
  optimizer      AdamW's step, zero_grad, clip_grad_norm_
  data           the batch made from the dataset's token lists (data.pair_batch,
                 data.collate_sft) and moved to the device
  all-reduce     gloo/NCCL collectives (under torchrun)
  python         the step's time outside every op: the Python of the loop and the model's
                 modules (ProfilerStep's own time), DDP's and autograd's bookkeeping (the
                 own time of their regions and of the backward's nodes)
The profiler adds a few microseconds an op, so the step is slower under it than in
tools/bench.py: the shares are what this table is for, pairs/s is tools/bench.py's.

The matmul bound: the recorded matmuls' FLOPs (the profiler's count) at the best rate
this machine reaches on the step's own matmul shapes (the 12 of each dtype that take the
most time, replayed alone in their dtype with the run's threads, best of 20). "of bound"
= that time over the step's time under the profiler; "bound pairs/s" = rank 0's pairs a
step over that time (attention and everything else free).

Run:  python -m tools.profile                            (tinychat and synthetic, 4 rows)
      python -m tools.profile --sets synthetic --rows packed-bf16 --extra --compile
      python -m tools.profile --sets tinychat --script sft --nproc 2   (the card's SFT)
"""

import argparse
import json
import os
import sys
import time

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile, record_function, schedule

from errors import ArgumentParser, UserError, run_main
from tools import bench

KINDS = ["matmul", "attention", "casts", "element-wise", "optimizer", "data", "all-reduce",
         "python"]
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
REGIONS = {  # an op inside one of these is that kind of work, whatever the op
    "data": "data", "optimizer": "optimizer", "Optimizer.step": "optimizer",
    "Optimizer.zero_grad": "optimizer", "aten::_scaled_dot_product": "attention",
    "aten::scaled_dot_product": "attention", "aten::_to_copy": "casts",
    "aten::_autocast_to": "casts", "gloo:": "all-reduce", "c10d::": "all-reduce",
    "nccl:": "all-reduce", "record_param_comms": "all-reduce",
}
DTYPES = {"float": torch.float32, "c10::BFloat16": torch.bfloat16, "c10::Half": torch.float16}


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=["tinychat", "synthetic"],
                        choices=["tinychat", "synthetic"])
    parser.add_argument("--rows", nargs="+", default=["default", "packed", "bf16",
                                                      "packed-bf16"],
                        choices=[r for r, f in bench.ROWS.items() if f is not None])
    parser.add_argument("--script", default="dpo", choices=["dpo", "sft"],
                        help="train_dpo.py (bench's flags) or train_sft.py (its own data; "
                        "the set's model shape, tinychat only)")
    parser.add_argument("--nproc", type=int, default=1, help="processes (> 1: torchrun; "
                        "rank 0 is profiled)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="the global batch (pairs for dpo, conversations for sft)")
    parser.add_argument("--warmup", type=int, default=5, help="steps before recording")
    parser.add_argument("--steps", type=int, default=20, help="steps recorded")
    parser.add_argument("--work-dir", default=os.path.join("out", "bench"))
    parser.add_argument("--pairs", type=int, default=2000, help="synthetic pairs")
    parser.add_argument("--json", default=None, help="also write every row here")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="flags added to every run (after the row's own)")
    args = parser.parse_args(argv)
    if args.script == "sft" and args.sets != ["tinychat"]:
        parser.error("--script sft profiles TinyChat's SFT only: give --sets tinychat")
    return args

# ----------------------------------------------------------------------------
# One profiled run (in its own process)


def kind_of(event):
    """The kind of work an op's own time is: its region, else its name."""
    e = event
    while e is not None:
        for prefix, kind in REGIONS.items():
            if e.name.startswith(prefix):
                return kind
        e = e.cpu_parent
    if event.name in MATMULS:
        return "matmul"
    # an aten op's own time is its kernel; a region's or autograd node's is Python
    return "element-wise" if event.name.startswith("aten::") else "python"


def traced(fn, region):
    def wrapper(*a, **k):
        with record_function(region):
            return fn(*a, **k)
    return wrapper


def profile_one(argv):
    """`python -m tools.profile one OUT.json {dpo|sft} WARMUP STEPS {time|flops} [flags]`:
    time records the ops' times only (a few percent slower than no profiler); flops
    records shapes and FLOPs too (twice as slow: its times are not used)."""
    out_path, script, warmup, steps, mode, script_argv = argv[0], argv[1], int(argv[2]), \
        int(argv[3]), argv[4], argv[5:]
    import data
    import train_dpo
    import train_sft
    data.pair_batch = traced(data.pair_batch, "data")
    data.collate_sft = traced(data.collate_sft, "data")
    torch.nn.utils.clip_grad_norm_ = traced(torch.nn.utils.clip_grad_norm_, "optimizer")
    times = []
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=mode == "flops",
                   with_flops=mode == "flops",
                   schedule=schedule(wait=0, warmup=warmup, active=steps, repeat=1))

    def step_hook(optimizer, *_):
        times.append(time.perf_counter())
        prof.step()

    hook = register_optimizer_step_post_hook(step_hook)
    with prof:
        (train_dpo if script == "dpo" else train_sft).main(script_argv)
    hook.remove()
    if int(os.environ.get("RANK", 0)) != 0:
        return
    if len(times) < warmup + steps:
        raise UserError(f"the run made {len(times)} optimizer steps, fewer than --warmup "
                        f"{warmup} + --steps {steps}")
    wall = times[warmup + steps - 1] - times[warmup - 1]
    seconds = dict.fromkeys(KINDS, 0.0)
    top_elementwise, matmuls = {}, {}
    events = prof.events()
    main_thread = next(e.thread for e in events if e.name.startswith("ProfilerStep"))
    for e in events:
        if e.thread != main_thread:
            continue  # the main thread's time only (the step's critical path)
        kind = kind_of(e)
        s = e.self_cpu_time_total / 1e6
        seconds[kind] += s
        if kind == "element-wise":
            top_elementwise[e.name] = top_elementwise.get(e.name, 0.0) + s
        if mode == "flops" and e.name in MATMULS and e.flops:
            key = (e.name, json.dumps(e.input_shapes), json.dumps(e.input_dtypes))
            calls, flops, spent = matmuls.get(key, (0, 0, 0.0))
            matmuls[key] = (calls + 1, flops + e.flops, spent + s)
    with open(out_path, "w") as f:
        json.dump({"matmuls": [[*k, *v] for k, v in matmuls.items()]} if mode == "flops" else
                  {"wall": wall, "steps": steps, "seconds": seconds,
                   "threads": torch.get_num_threads(),
                   "top_elementwise": sorted(top_elementwise.items(), key=lambda kv: -kv[1])[:6]},
                  f)

# ----------------------------------------------------------------------------
# The matmul bound


def replay_rate(name, shapes, dtypes, repeats=20):
    """FLOP/s of one matmul shape run alone (best of repeats), in its recorded dtype."""
    dtype = DTYPES[matmul_dtype(name, dtypes)]
    if name in ("aten::mm", "aten::bmm"):
        a, b = (torch.randn(s, dtype=dtype) for s in shapes[:2])
        fn = (lambda: torch.mm(a, b)) if name == "aten::mm" else (lambda: torch.bmm(a, b))
    else:  # addmm(bias, a, b) and baddbmm(bias, a, b)
        c, a, b = (torch.randn(s, dtype=dtype) for s in shapes[:3])
        fn = ((lambda: torch.addmm(c, a, b)) if name == "aten::addmm"
              else (lambda: torch.baddbmm(c, a, b)))
    flops = 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return flops / best


def matmul_dtype(name, dtypes):
    """The dtype a recorded matmul multiplies in (addmm/baddbmm: its second input)."""
    return dtypes[0] if name in ("aten::mm", "aten::bmm") else dtypes[1]


def peak_rates(rows, top=12):
    """The best replayed rate of each dtype over that dtype's most time-consuming matmul
    shapes in the rows."""
    shapes = {}
    for row in rows:
        for name, s, d, calls, flops, spent in row["matmuls"]:
            shapes[(name, s, d)] = shapes.get((name, s, d), 0.0) + spent
    rates = {}
    for dtype in {matmul_dtype(name, json.loads(d)) for name, _, d in shapes}:
        mine = [(k, v) for k, v in shapes.items() if matmul_dtype(k[0], json.loads(k[2])) == dtype]
        for (name, s, d), _ in sorted(mine, key=lambda kv: -kv[1])[:top]:
            rates[dtype] = max(rates.get(dtype, 0.0),
                               replay_rate(name, json.loads(s), json.loads(d)))
    return rates


def bound_seconds(row, rates):
    """The recorded matmuls' time at the peak rate of their dtype."""
    total = 0.0
    for name, s, d, calls, flops, spent in row["matmuls"]:
        total += flops / rates[matmul_dtype(name, json.loads(d))]
    return total

# ----------------------------------------------------------------------------


def command(set_name, row, args, out_json, mode):
    """The profiled run's command line."""
    if args.script == "dpo":
        script_argv = [*bench.TIMING, *bench.set_flags(set_name, args),
                       "--batch-size", str(args.batch_size), *bench.ROWS[row]]
    else:  # TinyChat's SFT, the tiny preset
        script_argv = ["--val-data", "", "--no-save", "--samples", "0", "--quiet",
                       "--dtype", "float32", "--batch-size", str(args.batch_size),
                       *bench.ROWS[row]]
    script_argv += ["--steps", str(args.warmup + args.steps), "--out-dir",
                    os.path.join(args.work_dir, "profile"), *args.extra]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={args.nproc}"] if args.nproc > 1 else [sys.executable])
    return [*launcher, "-m", "tools.profile", "one", out_json, args.script,
            str(args.warmup), str(args.steps), mode, *script_argv]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["one"]:
        return profile_one(argv[1:])
    args = parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    results = []
    for set_name in args.sets:
        for row in args.rows:
            r = {"set": set_name, "row": row}
            for mode in ("flops", "time"):  # the times from the run without shapes
                out_json = os.path.join(args.work_dir, f"profile_{set_name}_{row}_{mode}.json")
                log = os.path.join(args.work_dir, f"profile_{set_name}_{row}_{mode}.log")
                bench.run_once(command(set_name, row, args, out_json, mode), bench.HERE, log)
                with open(out_json) as f:
                    r.update(json.load(f))  # flops: the matmuls; time: everything else
            results.append(r)
            print(f"{set_name:<10} {row:<12} {r['wall'] / r['steps'] * 1e3:7.1f} ms a step "
                  "under the profiler", flush=True)
    torch.set_num_threads(results[0]["threads"])  # the profiled processes' own threads
    rates = peak_rates(results)
    print(f"\nmatmul peak on the steps' own shapes, {results[0]['threads']} thread(s): "
          + ", ".join(f"{DTYPES.get(k, k)} {v / 1e9:.0f} GFLOP/s" for k, v in rates.items()))
    per_step = args.batch_size // args.nproc  # rank 0's pairs or conversations a step
    unit = "pairs" if args.script == "dpo" else "conversations"
    print(f"\n{args.script}, {args.nproc} process(es), batch {args.batch_size}, "
          f"{args.steps} steps recorded after {args.warmup}; share of the step's time "
          f"(main thread; rank 0)\n")
    print("| data | row | ms a step | " + " | ".join(KINDS) + " | matmul GFLOP a step | "
          f"of bound | bound {unit}/s |")
    print("|---|---|---:|" + "---:|" * len(KINDS) + "---:|---:|---:|")
    for r in results:
        wall = r["wall"]
        bound = bound_seconds(r, rates)
        flops = sum(m[4] for m in r["matmuls"])
        cells = [f"{wall / r['steps'] * 1e3:.1f}"] + [f"{r['seconds'][k] / wall:.0%}"
                                                      for k in KINDS]
        cells += [f"{flops / r['steps'] / 1e9:.2f}", f"{bound / wall:.0%}",
                  f"{per_step * r['steps'] / bound:.1f}"]
        r["bound_seconds"] = bound
        print(f"| {r['set']} | {r['row']} | " + " | ".join(cells) + " |")
    print("\nlargest element-wise ops (share of the step):")
    for r in results:
        print(f"  {r['set']} {r['row']}: " + ", ".join(
            f"{name} {s / r['wall']:.0%}" for name, s in r["top_elementwise"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rates": rates, "rows": results}, f, indent=1)


if __name__ == "__main__":
    run_main(main)
