"""The CUDA-only logic, tested on the CPU: the device each process takes (every case of
--device, torchrun, local rank and visible GPUs), the RNG state a checkpoint keeps, the
reference cache's key, BCO's shift on skipped steps, the chunked head under
torch.compile, generation without a host sync per token, DDP's buffers, the host syncs
of a training step (ops whose result the host must wait for, counted on the CPU).
tests/gpu/ runs the same paths on a real GPU when there is one."""

import math
import warnings

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import checkpoint
import data
import devices
import train_dpo
import train_sft
import training
from conftest import dpo_args, sft_args, tiny_pairs
from errors import UserError
from loss import dpo_loss, dpo_objective, pair_logps, reference_logps
from extras import precomputed_reference
from model import ModelConfig, Transformer
from sample import generate


@pytest.mark.parametrize("requested, torchrun, local_rank, local_world, gpus, expected", [
    ("auto", False, 0, 1, 0, "cpu"),
    ("auto", False, 0, 1, 1, "cuda:0"),  # python train_sft.py on a GPU box: the GPU
    ("cuda", False, 0, 1, 1, "cuda:0"),  # used to crash: set_device("cuda") has no index
    ("cuda:1", False, 0, 1, 2, "cuda:1"),
    ("cpu", False, 0, 1, 8, "cpu"),
    ("auto", True, 1, 2, 2, "cuda:1"),  # torchrun: one GPU per process, by LOCAL_RANK
    ("cuda", True, 3, 4, 4, "cuda:3"),
    ("cpu", True, 1, 2, 2, "cpu"),
    ("auto", True, 1, 2, 0, "cpu"),
    ("cuda:0", True, 0, 1, 1, "cuda:0"),  # one process a node (two nodes): its own pick
    ("auto", True, 1, 2, 1, "more processes than GPUs"),
    ("cuda", True, 0, 2, 1, None),  # rank 0 of 2 on a 1-GPU box would get it; rank 1 not
    ("cuda:0", True, 0, 2, 2, "each of the 2 processes"),
    ("cuda", False, 0, 1, 0, "no CUDA GPU is visible"),
    ("cuda:2", False, 0, 1, 2, r"but 2 GPU\(s\) are visible"),
    ("gpu", False, 0, 1, 1, "use auto, cpu, cuda or cuda:N"),
])
def test_choose_device_covers_every_case(requested, torchrun, local_rank, local_world, gpus,
                                         expected):
    if expected is None:
        assert devices.choose_device(requested, torchrun, local_rank, local_world, gpus) == \
            "cuda:0"
        with pytest.raises(UserError, match="use --nproc_per_node 1"):
            devices.choose_device(requested, torchrun, 1, local_world, gpus)
    elif expected.startswith(("cpu", "cuda:")):
        assert devices.choose_device(requested, torchrun, local_rank, local_world,
                                      gpus) == expected
    else:
        words = "use --nproc_per_node 1" if expected.startswith("more") else expected
        with pytest.raises(UserError, match=words):
            devices.choose_device(requested, torchrun, local_rank, local_world, gpus)


def test_the_rng_state_is_this_processs_gpu_only(monkeypatch):
    """A checkpoint keeps the state of the process's own GPU, and a resumed process puts
    it back on its own GPU: not every visible GPU's (another machine may have fewer)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        lambda device: calls.append(("get", device)) or torch.zeros(8))
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device: calls.append(("set", device)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("all GPUs"))
    gpu = torch.device("cuda:1")
    state = checkpoint.rng_state(gpu)
    checkpoint.set_rng_state(state, gpu)
    assert calls == [("get", gpu), ("set", gpu)]
    cpu_state = checkpoint.rng_state(torch.device("cpu"))
    assert "cuda" not in cpu_state
    checkpoint.set_rng_state(state, torch.device("cpu"))  # a GPU checkpoint resumed on CPU
    assert len(calls) == 2


def test_the_reference_cache_key_has_the_device_type(files, sft_ckpt):
    args = train_dpo.parse_args(dpo_args(files, "unused", sft_ckpt, "--precompute-ref"))
    run = {"sft_ckpt_sha256": "a", "data_sha256": "b", "tokenizer_sha256": "c"}
    config = ModelConfig()
    keys = {t: precomputed_reference.reference_cache_key(args, run, config, True, t)
            for t in ("cpu", "cuda")}
    assert keys["cpu"] != keys["cuda"] and len(keys["cpu"]) == 16
    assert keys["cpu"] == precomputed_reference.reference_cache_key(args, run, config, True, "cpu")


def test_bco_delta_ignores_a_skipped_float16_step(files, sft_ckpt, tmp_path, monkeypatch):
    """A float16 step whose rewards are NaN is skipped by the GradScaler; BCO's running
    shift must not take its NaN, or every later loss is NaN."""
    calls = []
    real = train_dpo.dpo_loss

    def nan_at_the_second_step(*args, **kwargs):
        calls.append(1)
        losses, chosen, rejected = real(*args, **kwargs)
        if len(calls) == 2:
            return losses * math.nan, chosen * math.nan, rejected * math.nan
        return losses, chosen, rejected

    monkeypatch.setattr(train_dpo, "dpo_loss", nan_at_the_second_step)
    train_dpo.main(dpo_args(files, tmp_path, sft_ckpt, "--steps", "5", "--batch-size", "4",
                            "--loss", "bco_pair", "--dtype", "float16", "--log-every", "1",
                            "--val-data", ""))
    from checkpoint import load_checkpoint
    ckpt = load_checkpoint(str(tmp_path / "dpo.pt"))
    assert math.isfinite(ckpt["train_state"]["dpo"]["bco_delta"])
    import json
    with open(tmp_path / "dpo/metrics.jsonl") as f:
        log = [json.loads(line) for line in f]
    assert not math.isfinite(log[1]["loss"]) and log[-1]["skipped_steps"] >= 1
    assert all(math.isfinite(r["loss"]) for r in log[2:])  # it goes on


def test_the_chunked_head_does_not_recompile_for_every_length():
    """Under torch.compile (dynamic shapes) the chunked head's Python chunk loop used to
    specialise on N, the number of response tokens: a new graph per length (9 for 10
    lengths), then silently eager. It now runs eagerly outside the graph."""
    from torch._dynamo.utils import counters

    from loss import response_logps
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                    max_seq_len=64))
    compiled = torch.compile(model, dynamic=True, backend="eager")
    graphs = []
    for n in range(5, 15):
        ids = torch.randint(0, 50, (2, 20))
        mask = torch.zeros(2, 20, dtype=torch.long)
        mask[:, 20 - n:] = 1
        logps, _ = response_logps(compiled, ids, mask, chunked_head=True)
        logps.sum().backward()
        graphs.append(counters["stats"]["unique_graphs"])
    # the blocks, then the fp32 head's block on either side of the eager chunked head;
    # none added by lengths 7..14
    assert graphs[1] <= 3 and graphs[-1] == graphs[1], graphs
    torch._dynamo.reset()


def test_generation_syncs_with_the_host_once_in_16_tokens(monkeypatch):
    """No `if done[b]` or int(next_id[b]) per token: the new ids stay on the device and
    come back in one copy; whether every row is done is looked at every 16 tokens."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                    max_seq_len=128)).eval()
    ids = torch.randint(0, 50, (4, 5))
    expected = generate(model, ids, 64, temperature=0, stop_id=7)
    syncs = []
    for name in ("__bool__", "item", "tolist", "__int__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name:
                            syncs.append(_name) or _real(self, *a))
    assert generate(model, ids, 64, temperature=0, stop_id=7) == expected
    assert len(syncs) <= 64 // 16 + 1, syncs
    monkeypatch.undo()
    for row in expected:  # the rows stop at stop_id, included
        assert 7 not in row[:-1]


def test_ddp_does_not_resend_the_rope_tables(monkeypatch):
    seen = {}
    monkeypatch.setattr(training, "DDP", lambda model, **kwargs: seen.update(kwargs) or model)
    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, n_kv_heads=2))
    training.wrap_model(model, False, training.Dist(0, 0, 2, torch.device("cpu")))
    assert seen == {"device_ids": None, **training.NO_FORWARD_BUFFER_SYNC}


def test_ddp_is_wrapped_without_a_warning_and_syncs_no_buffer_per_forward():
    """A real DDP (a one-process gloo group): no FutureWarning about broadcast_buffers
    (deprecated in torch 2.13), and no buffer sync before each forward."""
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4,
                                        n_kv_heads=2))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ddp = training.wrap_model(model, False, training.Dist(0, 0, 2, torch.device("cpu")))
        assert [str(w.message) for w in caught] == []
        assert not ddp.will_sync_module_buffers()
    finally:
        dist.destroy_process_group()



def test_compile_wraps_ddp_so_it_sees_the_gradient_buckets():
    """DDP first, then torch.compile: compile splits its graph at DDP's buckets, and each
    bucket's all-reduce overlaps the backward (compiled first, DDP saw one opaque
    module). The loop's model.no_sync() still reaches DDP through the compiled module."""
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4,
                                        n_kv_heads=2))
        wrapped = training.wrap_model(model, True, training.Dist(0, 0, 2, torch.device("cpu")))
        assert isinstance(wrapped, torch._dynamo.eval_frame.OptimizedModule)
        ddp = wrapped._orig_mod
        assert isinstance(ddp, training.DDP) and ddp.module is model
        with wrapped.no_sync():
            assert not ddp.require_backward_grad_sync
        assert ddp.require_backward_grad_sync
    finally:
        dist.destroy_process_group()


def test_tf32_is_switched_on_for_cuda_only():
    """float32 on CUDA multiplies in TF32 (devices.use_tf32, from setup_distributed on a
    CUDA device); a CPU run leaves PyTorch's flags as they were."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        training.setup_distributed("cpu")
        assert torch.backends.cuda.matmul.allow_tf32 is False
        devices.use_tf32()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.mkldnn.matmul.fp32_precision == "none"  # CPU: untouched
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before

class DataDependentOps(TorchDispatchMode):
    """Records the ops whose result the host must see before it can go on (on CUDA: a
    wait for the GPU): nonzero (what a boolean-mask index and torch.where(cond) run),
    a boolean-mask index, item(), bincount (its max), masked_select, masked_scatter."""
    NAMES = {"nonzero", "_local_scalar_dense", "bincount", "masked_select", "masked_scatter"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "index" and any(t is not None and t.dtype == torch.bool for t in args[1]):
            self.seen.append(("bool index", tuple(args[0].shape)))
        elif name in self.NAMES:
            self.seen.append((name, tuple(args[0].shape)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("packed", [False, True])
def test_a_dpo_micro_step_asks_the_device_nothing(packed):
    """L9: the DPO micro-step as train_dpo.py runs it (reference, policy, loss, backward)
    has no op whose result the host must wait for, but one nonzero per forward on the
    loss mask, which data.pair_batch leaves on the host. Before: a boolean-mask index of
    the hidden states and of the labels, and masked_scatter, in every forward; with
    --packed, bincount."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         max_seq_len=64)
    model, reference = Transformer(config), Transformer(config).requires_grad_(False)
    pairs, cpu = tiny_pairs(), torch.device("cpu")
    batch = data.pair_batch(pairs, range(len(pairs)), cpu, packed)
    mode = DataDependentOps()
    with mode:
        ref = reference_logps(reference, None, range(len(pairs)), batch, cpu, packed)
        logps, n_tokens = pair_logps(model, batch, packed)
        loss, _ = dpo_objective(dpo_loss, logps, n_tokens, ref, 0.5, model.aux_loss, beta=0.1)
        loss.backward()
    if packed:
        assert mode.seen == []
    else:
        ids, mask = batch
        assert mask.device.type == "cpu"
        rows, T = ids.shape
        assert mode.seen == [("nonzero", (rows * (T - 1),))] * 2  # the host mask, twice


def test_the_moe_routes_with_one_host_look_per_layer(monkeypatch):
    """L9: the mixture of experts groups its tokens by expert with one look from the host
    a layer (the experts' counts), not a torch.where (a nonzero) per expert."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=3, n_heads=4,
                                    n_kv_heads=2, n_experts=4, experts_per_token=2))
    ids = torch.randint(0, 50, (2, 9))
    looks = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: looks.append(1) or real(self))
    mode = DataDependentOps()
    with mode:
        model(ids).sum().backward()
    assert mode.seen == [] and len(looks) == 3


def test_the_plain_head_step_compiles_without_a_graph_break():
    """L9: the head reads its positions as indices, not through a boolean mask, whose
    nonzero broke the compiled graph in two."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4,
                                    n_kv_heads=2, max_seq_len=64))
    ids, mask = data.pair_batch(tiny_pairs(), range(3), torch.device("cpu"))
    at = mask[:, 1:].bool().flatten().nonzero().squeeze(1)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids[:, :-1], head_at=at)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_a_training_step_reads_from_the_device_once(files, sft_ckpt, tmp_path, monkeypatch,
                                                    stage):
    """L9: the step's metrics and its gradient norm come back to the host in one
    tolist(), not an item() for the norm and a tolist() for the metrics. Counted through
    the scripts: runs of 2 and 6 steps differ by 4 reads."""
    reads = []
    for name in ("item", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _real=real, _name=name:
                            reads.append(_name) or _real(self))
    counts = []
    for steps in (2, 6):
        reads.clear()
        common = ["--steps", str(steps), "--batch-size", "4", "--val-data", "", "--no-save"]
        if stage == "sft":
            train_sft.main(sft_args(files, tmp_path / str(steps), *common))
        else:
            train_dpo.main(dpo_args(files, tmp_path / str(steps), sft_ckpt, *common))
        counts.append(list(reads))
    assert len(counts[1]) - len(counts[0]) == 4, counts
