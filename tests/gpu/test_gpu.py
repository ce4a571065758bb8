"""The GPU tier: the same scripts on a CUDA GPU. Skipped, with the reason shown
(`pytest -rs`), where torch.cuda.is_available() is false; `bash scripts/gpu_check.sh`
runs it on a borrowed GPU. CUDA's kernels are not bit-reproducible (atomics in SDPA's
backward, index_add_), so equalities here hold within stated tolerances, not exactly."""

import functools
import json
import subprocess
import sys

import pytest
import torch

import data
import train_dpo
import train_sft
from conftest import ROOT, dpo_args, max_diff, sft_args, tiny_pairs, weights
from checkpoint import load_checkpoint, model_from_checkpoint
from loss import dpo_loss, dpo_objective, pair_logps, reference_logps
from model import Transformer, make_config
from sample import generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU here: the GPU tier runs where "
                                "torch.cuda.is_available() (bash scripts/gpu_check.sh)")
GPU = ["--device", "cuda"]  # after conftest's --device cpu: the last one counts
TOL = 1e-3  # CUDA: non-deterministic reductions, and float32 matmuls in TF32 (trainers)


@pytest.fixture(autouse=True)
def restore_tf32():
    """The trainers switch TF32 on for CUDA (devices.use_tf32): each test starts with
    PyTorch's flags as they were."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def run(*cmd, timeout=600):
    result = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_sft_and_dpo_through_the_scripts(files, tmp_path, dtype):
    """Both stages on the GPU in each dtype; float32 multiplies in TF32 there."""
    run("train_sft.py", *sft_args(files, tmp_path, "--steps", "6", "--batch-size", "8",
                                  "--dtype", dtype, *GPU))
    run("train_dpo.py", *dpo_args(files, tmp_path, tmp_path / "sft.pt", "--steps", "6",
                                  "--batch-size", "8", "--dtype", dtype, "--log-every", "1",
                                  *GPU))
    log = records(tmp_path / "dpo/metrics.jsonl")
    assert abs(log[0]["loss"] - 0.6931471805599453) < 1e-3  # ln 2 at step 0
    assert all(r["loss"] == r["loss"] for r in log)  # no NaN
    assert max_diff(weights(tmp_path / "dpo.pt"), weights(tmp_path / "sft.pt")) > 0


def test_float16_overflow_is_skipped_and_counted_by_the_cuda_scaler(files, sft_ckpt, tmp_path,
                                                                    monkeypatch):
    init = 2.0 ** 40  # overflows at once in float16
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler,
                                                                   init_scale=init))
    train_dpo.main(dpo_args(files, tmp_path, sft_ckpt, "--steps", "30", "--batch-size", "4",
                            "--dtype", "float16", "--log-every", "1", *GPU))
    log = records(tmp_path / "dpo/metrics.jsonl")
    scale = load_checkpoint(str(tmp_path / "dpo.pt"))["train_state"]["scaler"]["scale"]
    skipped = log[-1]["skipped_steps"]
    assert 1 <= skipped < 30 and 2.0 ** skipped == init / scale


LAUNCH = ["-m", "torch.distributed.run", "--standalone"]


def test_torchrun_with_nccl(files, sft_ckpt, tmp_path):
    """--batch-size is the global batch: 1 process x 8 pairs and 2 x 4 train the same
    run. Two processes need two GPUs: NCCL refuses two ranks on one GPU ("Duplicate GPU
    detected"), and the trainers refuse it first, in one line (checked on one GPU)."""
    common = ["--steps", "4", "--batch-size", "8", *GPU]
    run(*LAUNCH, "--nproc_per_node=1", "train_dpo.py",
        *dpo_args(files, tmp_path / "one", sft_ckpt, *common))
    if torch.cuda.device_count() < 2:
        result = subprocess.run([sys.executable, *LAUNCH, "--nproc_per_node=2", "train_dpo.py",
                                 *dpo_args(files, tmp_path / "two", sft_ckpt, *common)],
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode != 0
        assert "error: torchrun started 2 processes on this machine but 1 GPU(s)" in \
            result.stderr, result.stderr[-2000:]
        pytest.skip("one GPU: NCCL ran with 1 process (no all-reduce); 2 processes on one "
                    "GPU are refused (NCCL does not allow two ranks on one GPU)")
    run(*LAUNCH, "--nproc_per_node=2", "train_dpo.py",
        *dpo_args(files, tmp_path / "two", sft_ckpt, *common))
    assert max_diff(weights(tmp_path / "one/dpo.pt"), weights(tmp_path / "two/dpo.pt")) < TOL
    run(*LAUNCH, "--nproc_per_node=2", "train_dpo.py",  # DDP, then compile (training.py)
        *dpo_args(files, tmp_path / "compiled", sft_ckpt, *common, "--compile"))
    assert max_diff(weights(tmp_path / "two/dpo.pt"),
                    weights(tmp_path / "compiled/dpo.pt")) < TOL


def test_kv_cache_generation_equals_full_reforward_on_the_gpu():
    torch.manual_seed(0)
    model = Transformer(make_config("tiny", vocab_size=97, dim=64, n_layers=2, n_heads=4,
                                    n_kv_heads=2, max_seq_len=64)).cuda().eval()
    ids = torch.randint(0, 97, (3, 7), device="cuda")
    cached = generate(model, ids, 20, temperature=0)
    full = ids
    with torch.no_grad():
        for _ in range(20):
            full = torch.cat([full, model(full)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert cached == full[:, 7:].tolist()


@pytest.mark.parametrize("layout", [[], ["--packed"]])
def test_compile_makes_one_graph_for_every_length(files, sft_ckpt, tmp_path, layout):
    """12 steps meet ~12 sequence lengths: dynamic shapes compile one graph for the
    layout, and no frame falls back to eager at Dynamo's recompile limit (8). Recompiling
    for each length (dynamic=False) gives 8 graphs and a failed frame: this fails."""
    from torch._dynamo.utils import counters
    common = ["--steps", "12", "--batch-size", "4", "--log-every", "1", *layout, *GPU]
    train_dpo.main(dpo_args(files, tmp_path / "eager", sft_ckpt, *common))
    torch._dynamo.reset()
    counters.clear()
    train_dpo.main(dpo_args(files, tmp_path / "compiled", sft_ckpt, *common, "--compile"))
    stats = {k: dict(v) for k, v in counters.items() if k in ("stats", "frames")}
    assert counters["stats"]["unique_graphs"] == 1, stats
    assert counters["frames"]["total"] == counters["frames"]["ok"], stats
    eager = records(tmp_path / "eager/dpo/metrics.jsonl")
    compiled = records(tmp_path / "compiled/dpo/metrics.jsonl")
    assert len(eager) == len(compiled) == 12
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(eager, compiled)) < 1e-2
    torch._dynamo.reset()


@pytest.mark.parametrize("packed", [False, True])
def test_the_dpo_forwards_and_loss_never_wait_for_the_gpu(packed):
    """With torch.cuda.set_sync_debug_mode("error") any op that waits for the GPU raises:
    a DPO micro-step's batch, reference and policy forwards and loss have none (the
    backward, PyTorch's own kernels, is not checked). CPU twin: tests/test_gpu_ready.py."""
    torch.manual_seed(0)
    config = make_config("tiny", vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         max_seq_len=64)
    model = Transformer(config).cuda()
    reference = Transformer(config).cuda().requires_grad_(False)
    pairs, cuda, idx = tiny_pairs(), torch.device("cuda"), range(3)
    for _ in range(2):  # the first micro-step also warms the allocators up
        torch.cuda.set_sync_debug_mode("error")
        try:
            batch = data.pair_batch(pairs, idx, cuda, packed)
            ref = reference_logps(reference, None, idx, batch, cuda, packed)
            logps, n_tokens = pair_logps(model, batch, packed)
            loss, _ = dpo_objective(dpo_loss, logps, n_tokens, ref, 0.5, model.aux_loss,
                                    beta=0.1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        loss.backward()


def test_chunked_head_and_packed_equal_the_plain_path(files, sft_ckpt, tmp_path):
    common = ["--steps", "3", "--batch-size", "4", "--lr", "1e-4", *GPU]
    for name, extra in (("plain", []), ("chunked", ["--chunked-head"]),
                        ("packed", ["--packed"])):
        train_dpo.main(dpo_args(files, tmp_path / name, sft_ckpt, *common, *extra))
    plain = weights(tmp_path / "plain/dpo.pt")
    assert max_diff(plain, weights(tmp_path / "chunked/dpo.pt")) < TOL
    assert max_diff(plain, weights(tmp_path / "packed/dpo.pt")) < TOL


def test_resume_on_the_gpu(files, sft_ckpt, tmp_path):
    common = ["--steps", "6", "--batch-size", "8", *GPU]
    train_dpo.main(dpo_args(files, tmp_path / "a", sft_ckpt, *common))
    train_dpo.main(dpo_args(files, tmp_path / "b", sft_ckpt, *common, "--stop-after", "3"))
    train_dpo.main(dpo_args(files, tmp_path / "b", sft_ckpt, *common, "--resume"))
    assert max_diff(weights(tmp_path / "a/dpo.pt"), weights(tmp_path / "b/dpo.pt")) < TOL


def test_a_gpu_checkpoint_loads_on_the_cpu_and_back(files, sft_ckpt, tmp_path):
    """A checkpoint written on the GPU holds CPU tensors: plain torch.load (no
    map_location, weights only) opens it on a machine without a GPU."""
    train_sft.main(sft_args(files, tmp_path, "--steps", "2", "--batch-size", "8", *GPU))
    raw = torch.load(tmp_path / "sft.pt", weights_only=True)
    assert all(t.device.type == "cpu" for t in raw["model"].values())
    ckpt = load_checkpoint(str(tmp_path / "sft.pt"))
    model = model_from_checkpoint(ckpt).eval()
    torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32, not TF32
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        on_cpu = model(ids)
        on_gpu = model.cuda()(ids.cuda()).cpu()
    assert (on_cpu - on_gpu).abs().max().item() < TOL


def test_evaluation_and_sampling_on_the_gpu(sft_ckpt, tmp_path):
    out = run("sample.py", "--ckpt", sft_ckpt, "--prompt", "What is 7 + 5?", "--device", "cuda")
    assert "sft.pt:" in out
    report = tmp_path / "eval.json"
    run("evaluate.py", "--ckpt", sft_ckpt, "--limit", "12", "--samples", "2",
        "--max-new-tokens", "8", "--json", report)  # --device auto: the GPU
    with open(report) as f:
        assert json.load(f)["args"]["device"] == "cuda:0"
