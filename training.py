"""What both trainers share around their loops: the distributed set-up, the model wrapped
for DDP and compile, autocast, held-out batches split over ranks, the optimizer and the
lr schedule (lr_at, once a step). A step's own work, its AMP update and its metrics'
all-reduce (loss.read_step) are in the two scripts, loss.py, data.py and model.py.

Not run directly; see train_sft.py and train_dpo.py.
"""

import inspect
import math
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import devices

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# DDP's switch for the buffer sync before each forward: forward_sync_buffers from torch
# 2.13 (which deprecates broadcast_buffers with a FutureWarning), broadcast_buffers before
NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DDP).parameters
                          else {"broadcast_buffers": False})


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
        devices.use_tf32()
    if ddp and not dist.is_initialized():  # already, when train_dpo.py ran the SFT stage
        on_gpu = {"device_id": torch.device(device)} if device.startswith("cuda") else {}
        # device_id: NCCL binds this rank to its GPU at once (no barrier guessing it)
        dist.init_process_group(backend="nccl" if on_gpu else "gloo", **on_gpu)
    if ddp and device == "cpu":  # share the cores between the processes on this machine
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))
    return Dist(rank, local_rank, world_size, torch.device(device))


def wrap_model(model, compile_model, dist_info):
    """The model the loop calls: DDP-wrapped under torchrun, then optionally
    torch.compile'd (in that order, so that compile splits the graph at DDP's gradient
    buckets and each bucket's all-reduce overlaps the rest of the backward). Keep the
    unwrapped model to save and to build the optimizer from."""
    if dist_info.world_size > 1:
        device = dist_info.device
        # no buffer sync before each forward: the only buffers are the RoPE tables, the
        # same on every rank (~25 MB a forward at minimind-768 otherwise)
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    **NO_FORWARD_BUFFER_SYNC)
    if compile_model:  # batch shapes vary from step to step: compile for dynamic shapes
        model = torch.compile(model, dynamic=True)  # model.no_sync() reaches DDP's
    return model


def autocast(device, dtype_name):
    """torch.autocast for bfloat16/float16 on CPU or CUDA; nothing for float32."""
    if dtype_name == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype_name])


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
