"""Set-up helpers that train_sft.py and train_dpo.py share: their common flags,
distributed set-up, AMP, metrics logging and resumable training state. Nothing
here runs inside a training step: the loops, and everything a step calls, are
in the two scripts, loss.py, data.py and model.py.

Not run directly; see train_sft.py and train_dpo.py.
"""

import argparse
import copy
import dataclasses
import hashlib
import importlib
import math
import json
import os
import random
import shlex
import signal
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import devices
import tokenizer
from checkpoint import check_tokenizer, load_checkpoint, model_from_checkpoint
from errors import UserError, run_main
from model import Transformer, config_from_args

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_training_args(parser, defaults):
    """Flags both stages share; `defaults` holds the stage's own default values."""
    a = parser.add_argument
    a("--out-dir", default=defaults["out_dir"], help="where checkpoints and metrics go")
    a("--epochs", type=float, default=defaults["epochs"], help="passes over the training data")
    a("--steps", type=int, default=None,
      help="exactly this many optimizer steps (overrides --epochs)")
    a("--batch-size", type=int, default=defaults["batch_size"],
      help="examples per micro-batch per process")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--lr", type=float, default=defaults["lr"], help="peak learning rate")
    a("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of --lr")
    a("--warmup-steps", type=int, default=defaults["warmup_steps"], help="linear warm-up steps")
    a("--weight-decay", type=float, default=0.1, help="AdamW decay on matrices only")
    a("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    a("--max-len", type=int, default=defaults["max_len"], help="longest sequence in tokens")
    a("--dtype", default="float32", choices=sorted(DTYPES),
      help="autocast dtype; float16 also enables a GradScaler")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a("--seed", type=int, default=1337, help="seed for initialisation and data order")
    a("--group-by-length", action=argparse.BooleanOptionalAction, default=True,
      help="batch examples of similar length together: about 2x less padding on TinyChat")
    a("--eval-every", type=int, default=defaults["eval_every"],
      help="validate every N steps (0: only at the end)")
    a("--log-every", type=int, default=10, help="write metrics every N steps")
    a("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    a("--resume", action="store_true", help="continue from the checkpoint in --out-dir")
    a("--stop-after", type=int, default=None,
      help="stop (and save) after N steps of this run; the schedule still spans the whole "
      "run, so a later --resume continues it (for time-limited jobs)")
    a("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    a("--chunked-head", action="store_true", help="log-probs through extras/chunked_head.py: "
      "same numbers, no (N, V) logits tensor: for large vocabularies")
    a("--no-save", action="store_true", help="write no checkpoint (for timing runs)")
    a("--skip-invalid", action="store_true", help="skip bad data records (counted) instead "
      "of stopping at the first")
    a("--quiet", action="store_true", help="no progress bar")
    a("--wandb", default=None, metavar="PROJECT", help="also log the metrics.jsonl records "
      "to this Weights & Biases project (pip install wandb; WANDB_MODE=offline works)")


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def setup_distributed(device="auto"):
    """Start torch.distributed when launched by torchrun (RANK is set): NCCL on CUDA, gloo on
    CPU. Plain `python script.py` gets world_size 1 and the same code path."""
    ddp = "RANK" in os.environ
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    device = devices.choose_device(device, ddp, local_rank, local_world_size,
                           torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if ddp and not dist.is_initialized():  # already, when train_dpo.py ran the SFT stage
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if ddp and device == "cpu":  # share the cores between the processes on this machine
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))
    return Dist(rank, local_rank, world_size, torch.device(device))


def wrap_model(model, compile_model, dist_info):
    """The model the loop calls: optionally torch.compile'd, and DDP-wrapped under torchrun.
    Keep the unwrapped model to save and to build the optimizer from."""
    if compile_model:  # batch shapes vary from step to step: compile for dynamic shapes
        model = torch.compile(model, dynamic=True)
    if dist_info.world_size > 1:
        device = dist_info.device
        # broadcast_buffers off: the only buffers are the RoPE tables, the same on every
        # rank; DDP would otherwise send them before every forward (~25 MB at minimind-768)
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    broadcast_buffers=False)
    return model


def restore_training_state(resume, optimizer, scaler, device):
    """Load optimizer, scaler and RNG states saved by train_state(); return the step to
    continue from (0 when not resuming)."""
    if resume is None:
        return 0
    state = resume["train_state"]
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"], device)
    return state["step"]


def load_resume(ckpt_path, enabled, model, tokenizer_id, run):
    """With --resume: the checkpoint at ckpt_path (there must be one), checked to be the
    same run (see run_identity), its weights loaded into model (restore_training_state
    takes the rest later); without --resume, None."""
    if not enabled:
        return None
    if not os.path.exists(ckpt_path):  # never start over silently (and lose the metrics)
        raise UserError(f"--resume: no checkpoint at {ckpt_path} to continue from; run "
                        "without --resume to start a new run")
    resume = load_checkpoint(ckpt_path)
    check_tokenizer(resume, tokenizer_id, ckpt_path)
    saved = resume.get("train_state", {}).get("run")
    if saved is None:
        raise UserError(f"{ckpt_path}: has no training state to resume from")
    differences = [f"{k}: {saved.get(k)!r} in the checkpoint, {run.get(k)!r} now"
                   for k in sorted(set(saved) | set(run)) if saved.get(k) != run.get(k)]
    if differences:
        raise UserError(f"{ckpt_path}: --resume would continue another run; it differs in "
                        + "; ".join(differences) + ". Resume with the same settings, or "
                        "start a new run in another --out-dir.")
    model.load_state_dict(resume["model"], strict=True)
    return resume


def run_identity(args, keys, world_size, config):
    """What defines a run, so that --resume refuses to continue a different one (other
    data, batch, schedule or loss would silently remap steps): the values of the flags in
    `keys`, the number of processes, the model shape and the SHA-256 of each input file.
    Flags that do not change the numbers (--eval-every, --quiet, ...) are left out."""
    run = {k: getattr(args, k) for k in keys}
    run.update(world_size=world_size, model=asdict(config))
    for k in ("data", "sft_ckpt", "ref_ckpt", "tokenizer"):
        path = getattr(args, k, None)
        if path:
            run[f"{k}_sha256"] = file_digest(path)
    return run


def check_max_len(max_len, config):
    """--max-len must fit the model's context (else the first long batch would fail)."""
    if max_len > config.max_seq_len:
        raise UserError(f"--max-len {max_len} is longer than the model's context "
                        f"(max_seq_len {config.max_seq_len})")


def file_digest(path):
    """SHA-256 of a file's bytes, as hex."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def cleanup_distributed():
    """Leave the process group once every rank is done (rank 0 may still be saving or
    printing samples: a rank tearing down gloo before the others can abort them)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def autocast(device, dtype_name):
    """torch.autocast for bfloat16/float16 on CPU or CUDA; nothing for float32."""
    if dtype_name == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype_name])


def make_scaler(device, dtype_name):
    """A GradScaler, enabled for float16 only (bfloat16 has float32's range)."""
    return torch.amp.GradScaler(device.type, enabled=dtype_name == "float16")


class NonFiniteLoss(UserError):  # ends the run with one line, like a user error
    """A NaN/inf loss in float32/bfloat16 training (in float16 such a step is the
    GradScaler's to skip): training stops with this message."""

    def __init__(self, loss_value, step, dtype_name):
        super().__init__(f"loss became {loss_value} at step {step} ({dtype_name}); stopping. "
                         "The last checkpoint on disk is the last good one. Try a lower "
                         "--lr or a smaller --grad-clip.")


class Interrupted(Exception):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler, or torchrun stopping the other ranks)."""


def run(main):
    """Run a training script's main() so that it ends with one clear line, not a traceback,
    on a user's mistake (errors.run_main), when the loss turns non-finite or when the
    process is asked to stop. Checkpoints are written atomically, so the last one on
    disk is whole either way."""

    def stop(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        run_main(main)
        cleanup_distributed()
    except Interrupted as e:
        raise SystemExit(f"stopped by {e}: the last checkpoint in --out-dir is intact; run "
                         "the same command with --resume to continue from it") from None


def eval_batches(n, batch_size, dist_info):
    """This rank's share of a held-out set of n examples: every world_size-th batch of
    consecutive indices. A rank may get none; the totals are summed over ranks after."""
    batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    return batches[dist_info.rank::dist_info.world_size]


def all_reduce_sum(values, world_size, device):
    """Sum each number of a list over all ranks (one collective); returns a list."""
    if world_size == 1:
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl (rank 0 only); with
    --wandb PROJECT the same records also go to Weights & Biases (imported only then;
    WANDB_MODE=offline keeps them on disk)."""

    def __init__(self, path, enabled, resume, args=None):
        self.path, self.enabled, self.wandb_run = path, enabled, None
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if not resume and os.path.exists(path):
                os.remove(path)
        if enabled and args is not None and args.wandb:
            try:
                wandb = importlib.import_module("wandb")
            except ImportError:
                raise UserError("--wandb needs the wandb package: pip install wandb") from None
            stage = os.path.basename(os.path.dirname(os.path.abspath(path)))
            self.wandb_run = wandb.init(project=args.wandb, config=vars(args),
                                        name=f"{stage} {os.path.abspath(args.out_dir)}")

    def write(self, record):
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if self.wandb_run is not None:
                self.wandb_run.log(record, step=record["step"])


# DPO: the policy and the reference


def policy_from_sft(args, vocab_size, tokenizer_id):
    """The policy at step 0: the SFT checkpoint, or with --sft-ckpt '' a fresh model shaped
    by the model flags (for timing runs). Dropout is off in DPO, for policy and reference."""
    if not args.sft_ckpt:
        return Transformer(dataclasses.replace(config_from_args(args, vocab_size), dropout=0.0))
    sft = load_checkpoint(args.sft_ckpt)
    check_tokenizer(sft, tokenizer_id, args.sft_ckpt)
    sft["config"]["dropout"] = 0.0
    return model_from_checkpoint(sft, args.sft_ckpt)


def reference_model(args, policy, tokenizer_id, device):
    """The frozen reference: a copy of the policy at step 0 (the SFT model), or the
    --ref-ckpt model; no dropout, no gradients."""
    if not args.ref_ckpt:
        return copy.deepcopy(policy).eval().requires_grad_(False)
    ckpt = load_checkpoint(args.ref_ckpt)
    check_tokenizer(ckpt, tokenizer_id, args.ref_ckpt)
    ckpt["config"]["dropout"] = 0.0
    reference = model_from_checkpoint(ckpt, args.ref_ckpt).to(device)
    if reference.config != policy.config:
        raise UserError(f"--ref-ckpt {args.ref_ckpt}: its model shape differs from the policy's "
                        f"({reference.config} vs {policy.config})")
    return reference.eval().requires_grad_(False)


def sft_stage_first(args, log):
    """No SFT checkpoint at the default path: on TinyChat's data, train one now, the same
    code as `train_sft.py --out-dir OUT_DIR` under the same launcher (torchrun or not);
    on other data, say how (its SFT data is the user's to name)."""
    if not (data.is_tinychat(args.data) and args.tokenizer == tokenizer.DEFAULT_TOKENIZER):
        raise UserError(f"no SFT checkpoint at {args.sft_ckpt}: train one on your own SFT data "
                        f"first (python train_sft.py --data SFT.jsonl --out-dir {args.out_dir}),"
                        " or pass --sft-ckpt PATH")
    sft_argv = ["--out-dir", args.out_dir, "--device", args.device, "--seed", str(args.seed),
                *(["--quiet"] if args.quiet else []), *shlex.split(args.sft_flags)]
    log(f"no SFT checkpoint at {args.sft_ckpt}: training it first, as train_sft.py "
        f"{' '.join(sft_argv)}")
    import train_sft  # the SFT stage's own script (it imports this module)
    train_sft.main(sft_argv)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank waits for rank 0's sft.pt


# Optimizer and learning-rate schedule

def configure_optimizer(model, lr, weight_decay, betas=(0.9, 0.95)):
    """AdamW with weight decay on matrices (embeddings, linear weights) only, not on the
    RMSNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # fused: one kernel for the whole update (CPU and CUDA; 4 ms against 16 ms a step for
    # the 5M parameters of bench.py's synthetic shape on 2 CPU cores)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def lr_at(step, total_steps, lr, warmup_steps, min_lr_ratio):
    """Linear warm-up to lr over warmup_steps, then cosine decay to lr * min_lr_ratio.

        >>> [round(lr_at(s, 10, 1.0, 2, 0.1), 3) for s in (0, 1, 2, 6, 10)]
        [0.5, 1.0, 1.0, 0.55, 0.1]
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * cosine)


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device):
    """The random states, as tensors and plain values (checkpoint-safe): Python's, the
    CPU's and, on a GPU, that of this process's GPU only (not every visible one: another
    machine may have fewer). Every rank seeds alike and draws alike, so rank 0's state,
    which the checkpoint keeps, is every rank's."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and torch.is_tensor(state.get("cuda")):  # on this rank's GPU
        torch.cuda.set_rng_state(state["cuda"], device)


def train_state(optimizer, scaler, step, args, run, device):
    """What --resume needs besides the weights. The data position is the step itself: the
    batch order is a pure function of (seed, step) (data.BatchOrder)."""
    return {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
            "rng": rng_state(device), "args": vars(args), "run": run}


def total_steps(args, steps_per_epoch):
    """Optimizer steps for the run: --steps, or --epochs over the data."""
    if args.steps is not None:
        return args.steps
    return max(1, int(args.epochs * steps_per_epoch))


def last_step(args, start_step, n_steps):
    """Where this run stops: the end of the schedule, or earlier with --stop-after."""
    return n_steps if args.stop_after is None else min(n_steps, start_step + args.stop_after)
