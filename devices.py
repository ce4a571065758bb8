"""Which device each process takes, and what its hardware can do: the device choice as
a pure function (every case tested on CPU), TF32 on CUDA, the CPU's bfloat16 support,
peak GPU memory, and a batch's copy to the device (to_device).
training.setup_distributed, the scripts and the batches use it.
"""

import os

import torch

from errors import UserError


def choose_device(requested, under_torchrun, local_rank, local_world_size, n_gpus):
    """The device this process trains on, as a string, from --device and the launch; a
    UserError where it cannot work. A pure function: every case is tested on CPU.

        >>> choose_device("auto", False, 0, 1, 0), choose_device("auto", False, 0, 1, 2)
        ('cpu', 'cuda:0')
        >>> choose_device("cuda", True, 1, 2, 2), choose_device("cuda:1", False, 0, 1, 2)
        ('cuda:1', 'cuda:1')
    """
    if requested == "auto":
        requested = "cuda" if n_gpus else "cpu"
    if requested == "cpu":
        return "cpu"
    if requested != "cuda" and not (requested.startswith("cuda:")
                                    and requested[5:].isdigit()):
        raise UserError(f"--device {requested}: use auto, cpu, cuda or cuda:N")
    if n_gpus == 0:
        raise UserError(f"--device {requested}, but no CUDA GPU is visible (--device cpu?)")
    if under_torchrun:
        if requested != "cuda" and local_world_size > 1:
            raise UserError(f"--device {requested} under torchrun: each of the "
                            f"{local_world_size} processes of a machine takes its own GPU "
                            "(cuda:LOCAL_RANK); pass --device cuda")
        index = local_rank if requested == "cuda" else int(requested[5:])
        if index >= n_gpus:
            raise UserError(f"torchrun started {local_world_size} processes on this machine "
                            f"but {n_gpus} GPU(s) are visible: use --nproc_per_node "
                            f"{n_gpus} (or --device cpu)")
        return f"cuda:{index}"
    index = 0 if requested == "cuda" else int(requested[5:])
    if index >= n_gpus:
        raise UserError(f"--device {requested}, but {n_gpus} GPU(s) are visible")
    return f"cuda:{index}"


def use_tf32():
    """float32 matmuls on CUDA in TF32 (PyTorch's "high" precision: 10-bit mantissa
    inputs, fp32 accumulation), ~8x faster on tensor cores than plain fp32, which
    PyTorch's default keeps. The trainers call it for a CUDA device only; CPU matmuls
    are not touched. bf16 and fp16 autocast do not use it."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def reset_peak_gpu_memory(device):
    """Start counting peak GPU memory again (each training stage reports its own peak:
    train_dpo.py may run the SFT stage first, in the same process)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def gpu_memory(device):
    """{"peak_gpu_mib": peak allocated so far this stage} on a GPU (no sync), else {}."""
    if device.type != "cuda":
        return {}
    return {"peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20}


def peak_gpu_memory(device):
    """", peak GPU memory N MiB" (torch.cuda.max_memory_allocated) on a GPU, else ""."""
    if device.type != "cuda":
        return ""
    return f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB"


CPUINFO = "/proc/cpuinfo"
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX512-BF16 and AMX; Arm BF16


def cpu_has_bf16():
    """Whether this CPU multiplies bfloat16 in hardware, read off the flags in CPUINFO;
    None where there is no such file (not Linux)."""
    if not os.path.exists(CPUINFO):
        return None
    with open(CPUINFO) as f:
        words = set(f.read().split())
    return any(flag in words for flag in CPU_BF16_FLAGS)


def auto_dtype(device_flag):
    """--dtype auto: bfloat16 when the run is on a CPU that multiplies bf16 in hardware
    (cpu_has_bf16), where autocast's bf16 matmuls make the step faster (docs/performance.md);
    float32 anywhere else, a GPU included (float32 with TF32 there, as before)."""
    on_cpu = device_flag == "cpu" or (device_flag == "auto" and not torch.cuda.is_available())
    return "bfloat16" if on_cpu and cpu_has_bf16() else "float32"


def announce_dtype(device, args, log):
    """Say at start-up that --dtype auto took bfloat16, and warn when an explicit --dtype
    bfloat16 will be slower than float32: on a CPU without bf16 instructions, PyTorch
    emulates them."""
    if args.dtype_auto and args.dtype == "bfloat16":
        log("dtype bfloat16 (--dtype auto: this CPU multiplies bfloat16 in hardware; "
            "--dtype float32 for full precision)")
    elif device.type == "cpu" and args.dtype == "bfloat16" and cpu_has_bf16() is False:
        log("warning: this CPU has no bfloat16 instructions (AVX512-BF16, AMX or Arm BF16): "
            "--dtype bfloat16 is emulated here and will be slower than float32")


def to_device(tensor, device):
    """A batch made on the CPU, onto device: on CUDA copied from pinned memory without
    blocking, so the copy overlaps the work already queued (a copy from pageable memory
    would wait for it)."""
    if device.type != "cuda" or tensor.is_cuda:
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
