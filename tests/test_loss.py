"""The DPO loss family and sequence log-probs against formulas written out by hand."""

import math

import pytest
import torch

from extras.chunked_head import ChunkedTokenLogps
from extras.packed import pack_pairs, packed_logps
from loss import (LOSS_TYPES, ChosenRejected, concatenated_logps, dpo_loss, preference_metrics,
                  sequence_logps)
from model import ModelConfig, Transformer


def test_sequence_logps_worked_example():
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3)], [5.0, -5.0]]])  # (1, 3, 2)
    logps, n = sequence_logps(logits, torch.tensor([[0, 1, 1]]), torch.tensor([[0, 1, 1]]))
    assert torch.allclose(logps, torch.tensor([math.log(1 / 2) + math.log(3 / 4)]))
    assert n.tolist() == [2.0]


def test_sequence_logps_is_a_sum_in_fp32_even_from_bf16():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 13).bfloat16()
    labels = torch.randint(0, 13, (3, 7))
    mask = torch.randint(0, 2, (3, 7))
    logps, n = sequence_logps(logits, labels, mask)
    assert logps.dtype == torch.float32
    ref = logits.float().log_softmax(-1)[:, :-1].gather(-1, labels[:, 1:, None]).squeeze(-1)
    assert torch.allclose(logps, (ref * mask[:, 1:]).sum(-1), atol=1e-5)
    assert torch.equal(n, mask[:, 1:].sum(-1).float())


def test_padding_never_changes_a_pairs_logps():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4,
                                    n_kv_heads=2, max_seq_len=64)).eval()
    seqs = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12]]
    masks = [[0, 0, 1, 1, 1], [0, 1, 1], [0, 0, 0, 1]]

    def batch_logps(extra_pad, pad_id):
        T = max(map(len, seqs)) + extra_pad
        ids = torch.full((3, T), pad_id)
        mask = torch.zeros(3, T, dtype=torch.long)
        for b, (s, m) in enumerate(zip(seqs, masks)):
            ids[b, :len(s)], mask[b, :len(m)] = torch.tensor(s), torch.tensor(m)
        with torch.no_grad():
            return sequence_logps(model(ids), ids, mask)[0]

    base = batch_logps(0, 0)
    for extra, pad in [(0, 49), (3, 0), (9, 17)]:
        assert (batch_logps(extra, pad) - base).abs().max() < 1e-5
    alone = []
    for s, m in zip(seqs, masks):  # each sequence in a batch of its own, no padding at all
        with torch.no_grad():
            alone.append(sequence_logps(model(torch.tensor([s])), torch.tensor([s]),
                                        torch.tensor([m]))[0])
    assert (torch.cat(alone) - base).abs().max() < 1e-5


def random_logps(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-torch.rand(n, generator=g, dtype=torch.float64) * 40 for _ in range(4)]


def test_step_zero_loss_is_ln2_and_rewards_are_zero():
    chosen, rejected, _, _ = random_logps()
    for smoothing in (0.0, 0.2):
        losses, rc, rr = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(),
                                  beta=0.1, label_smoothing=smoothing)
        assert torch.all(losses == math.log(2))
        assert torch.all(rc == 0) and torch.all(rr == 0)
    m = preference_metrics(losses, rc, rr, ChosenRejected(chosen, rejected))
    assert m["rewards/accuracies"] == 0 and m["rewards/margins"] == 0  # strict >


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_sigmoid_matches_per_example_formula(beta, smoothing):
    pc, pr, rc, rr = random_logps(seed=1)
    losses, cr, rjr = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=smoothing)
    for i in range(len(pc)):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        sig = 1 / (1 + math.exp(-beta * h))
        expected = -(1 - smoothing) * math.log(sig) - smoothing * math.log(1 - sig)
        assert losses[i].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert cr[i].item() == pytest.approx(beta * (pc[i].item() - rc[i].item()))
        assert rjr[i].item() == pytest.approx(beta * (pr[i].item() - rr[i].item()))


def test_ipo_uses_per_token_averages():
    torch.manual_seed(0)
    pc, pr, rc, rr = random_logps(seed=2)
    nc = torch.randint(1, 30, (len(pc),)).double()
    nr = torch.randint(1, 30, (len(pc),)).double()
    beta = 0.2
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo",
                            chosen_n_tokens=nc, rejected_n_tokens=nr)
    for i in range(len(pc)):
        h = (pc[i] / nc[i] - pr[i] / nr[i] - (rc[i] / nc[i] - rr[i] / nr[i])).item()
        assert losses[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-9)


def test_hinge_reference_free_and_sft_alpha():
    pc, pr, rc, rr = random_logps(seed=3)
    nc = torch.full_like(pc, 7.0)
    beta = 0.3
    hinge, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="hinge")
    zero = torch.zeros_like(pc)
    free, cr, _ = dpo_loss(pc, pr, zero, zero, beta=beta)  # what --reference-free passes
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta)
    rpo = losses + 0.5 * (-pc / nc)  # what train_dpo.py adds with --sft-alpha 0.5
    for i in range(len(pc)):
        h = (pc[i] - rc[i] - (pr[i] - rr[i])).item()
        assert hinge[i].item() == pytest.approx(max(0.0, 1 - beta * h), abs=1e-12)
        h_free = (pc[i] - pr[i]).item()
        assert free[i].item() == pytest.approx(math.log1p(math.exp(-beta * h_free)), rel=1e-9)
        assert cr[i].item() == pytest.approx(beta * pc[i].item())
        sig = math.log1p(math.exp(-beta * h))
        assert rpo[i].item() == pytest.approx(sig + 0.5 * -pc[i].item() / 7.0, rel=1e-9)


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def sigmoid(x):
    return math.exp(log_sigmoid(x))


# Each variant written out per example from its paper's formula, in plain Python floats.
# Arguments: policy and reference log-probs (sums), token counts, beta.
FORMULAS = {
    "robust": lambda pc, pr, rc, rr, nc, nr, b: (
        (1 - EPS) * -log_sigmoid(b * (pc - rc - pr + rr))
        + EPS * log_sigmoid(-b * (pc - rc - pr + rr))) / (1 - 2 * EPS),
    "norm": lambda pc, pr, rc, rr, nc, nr, b: -log_sigmoid(
        b * ((pc - rc) / nc - (pr - rr) / nr)),
    "dpop": lambda pc, pr, rc, rr, nc, nr, b: -log_sigmoid(
        b * ((pc - rc - pr + rr) - LAMBDA * max(0.0, rc - pc))),
    "simpo": lambda pc, pr, rc, rr, nc, nr, b: (
        -(1 - EPS) * log_sigmoid(b * pc / nc - b * pr / nr - GAMMA)
        - EPS * log_sigmoid(-(b * pc / nc - b * pr / nr - GAMMA))),
    "rdpo": lambda pc, pr, rc, rr, nc, nr, b: -log_sigmoid(
        b * (pc - rc - pr + rr) + ALPHA * (nc - nr)),
    "bco_pair": lambda pc, pr, rc, rr, nc, nr, b: (-log_sigmoid(b * (pc - rc) - DELTA)
                                                  - log_sigmoid(-(b * (pr - rr) - DELTA))),
    "nca_pair": lambda pc, pr, rc, rr, nc, nr, b: (-log_sigmoid(b * (pc - rc))
                                                  - 0.5 * log_sigmoid(-b * (pc - rc))
                                                  - 0.5 * log_sigmoid(-b * (pr - rr))),
    "apo_zero": lambda pc, pr, rc, rr, nc, nr, b: (1 - sigmoid(b * (pc - rc))
                                                  + sigmoid(b * (pr - rr))),
    "sppo_hard": lambda pc, pr, rc, rr, nc, nr, b: ((pc - rc - 1 / (2 * b)) ** 2
                                                   + (pr - rr + 1 / (2 * b)) ** 2),
    "orpo": lambda pc, pr, rc, rr, nc, nr, b: (
        -pc / nc - b * log_sigmoid(
            math.log(math.exp(pc / nc) / (1 - math.exp(pc / nc)))
            - math.log(math.exp(pr / nr) / (1 - math.exp(pr / nr))))),
}
EPS, LAMBDA, GAMMA, ALPHA, DELTA = 0.1, 50.0, 0.5, 0.01, 0.3


def test_the_variant_list_is_the_tested_list():
    assert set(LOSS_TYPES) == {"sigmoid", "ipo", "hinge"} | set(FORMULAS)


@pytest.mark.parametrize("loss_type", sorted(FORMULAS))
def test_variant_matches_its_per_example_formula(loss_type):
    pc, pr, rc, rr = random_logps(n=32, seed=5)
    g = torch.Generator().manual_seed(6)
    nc = torch.randint(1, 40, (32,), generator=g).double()
    nr = torch.randint(1, 40, (32,), generator=g).double()
    beta = 0.7
    losses, cr, rjr = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                               label_smoothing=EPS, chosen_n_tokens=nc, rejected_n_tokens=nr,
                               dpop_lambda=LAMBDA, simpo_gamma=GAMMA, rdpo_alpha=ALPHA,
                               bco_delta=DELTA)
    for i in range(32):
        args = [x[i].item() for x in (pc, pr, rc, rr, nc, nr)]
        assert losses[i].item() == pytest.approx(FORMULAS[loss_type](*args, beta), rel=1e-9)
        if loss_type in ("simpo", "orpo"):  # their own rewards: beta * averaged log-probs
            assert cr[i].item() == pytest.approx(beta * args[0] / args[4])
            assert rjr[i].item() == pytest.approx(beta * args[1] / args[5])
        else:
            assert cr[i].item() == pytest.approx(beta * (args[0] - args[2]))
            assert rjr[i].item() == pytest.approx(beta * (args[1] - args[3]))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("h", [1e4, -1e4])
def test_every_loss_is_finite_with_finite_gradients_at_h_1e4(loss_type, h):
    """A policy 1e4 nats from its reference either way, in fp32; the second pair's
    chosen answer is near-certain (log-prob -1e-4: ORPO's odds blow up there)."""
    far = -1.0 - abs(h)
    pc = torch.tensor([-1.0 if h > 0 else far, -1e-4], requires_grad=True)
    pr = torch.tensor([far if h > 0 else -1.0, -1.0 + h if h < 0 else far], requires_grad=True)
    rc, rr = torch.tensor([-1.0, -1.0]), torch.tensor([-1.0, -1.0])
    n = torch.tensor([1.0, 3.0])
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type=loss_type,
                            label_smoothing=0.1, chosen_n_tokens=n, rejected_n_tokens=n)
    assert ((pc - rc) - (pr - rr))[0].item() == h
    losses.sum().backward()
    assert torch.isfinite(losses).all(), losses
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


def test_sigmoid_gradient_wrt_h():
    torch.manual_seed(0)
    beta, N = 0.25, 16
    h = torch.randn(N, dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros(N, dtype=torch.float64)
    losses, _, _ = dpo_loss(h, zeros, zeros, zeros, beta=beta)  # pi_logratios = h
    losses.mean().backward()
    expected = -beta * torch.sigmoid(-beta * h.detach()) / N
    assert torch.allclose(h.grad, expected, atol=1e-15)


def test_concatenated_logps_equals_full_logits_path_and_names_chosen_rejected():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=30, dim=32, n_layers=1, n_heads=4,
                                    n_kv_heads=2, max_seq_len=32)).eval()
    ids = torch.randint(0, 30, (4, 9))  # 2 pairs: rows 0-1 chosen, rows 2-3 rejected
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1, 1],
                         [0, 0, 1, 1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        logps, n = concatenated_logps(model, ids, mask)
        whole, whole_n = sequence_logps(model(ids), ids, mask)
    assert torch.allclose(logps.chosen, whole[:2], atol=1e-5)
    assert torch.allclose(logps.rejected, whole[2:], atol=1e-5)
    assert n.chosen.tolist() == [3.0, 6.0] and n.rejected.tolist() == [5.0, 1.0]
    assert torch.equal(torch.cat([n.chosen, n.rejected]), whole_n)


def random_pairs(seed, shapes, vocab=37):
    """Pairs of the given (prompt, chosen, rejected) lengths with random ids; a chosen
    mask may have zeros inside (tokens not counted, as MiniMind's think blocks in SFT)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for p, c, r in shapes:
        seq = torch.randint(0, vocab, (p + c + r,), generator=g).tolist()
        chosen_mask = [1] * c
        if c > 2:
            chosen_mask[1] = 0
        items.append({"prompt": seq[:p], "chosen": seq[p:p + c], "chosen_mask": chosen_mask,
                      "rejected": seq[p + c:], "rejected_mask": [1] * r})
    return items


def test_bench_naive_trainer_computes_the_same_logps_as_the_fast_path():
    from tools import bench
    import data
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4,
                                    n_kv_heads=2, max_seq_len=64)).eval()
    items = random_pairs(1, [(5, 7, 3), (9, 2, 11), (4, 4, 4)])
    ids, mask = data.collate_pairs(items, pad_id=39)
    padded = torch.nn.functional.pad(ids, (0, 48 - ids.shape[1]), value=39)  # as naive_main
    padded_mask = torch.nn.functional.pad(mask, (0, 48 - ids.shape[1]))[:, 1:].float()
    with torch.no_grad():
        fast, _ = concatenated_logps(model, ids, mask)
        naive = (bench.log_probs_of(model(padded[:, :-1]), padded[:, 1:]) * padded_mask).sum(-1)
    assert (torch.cat([fast.chosen, fast.rejected]) - naive).abs().max() < 1e-5


@pytest.mark.parametrize("chunked_head", [False, True])
def test_packed_pairs_give_the_padded_rows_logps_and_gradients(chunked_head):
    import data
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4,
                                    n_kv_heads=2, max_seq_len=64))
    # a 1-token prompt, responses longer and shorter than each other, a chosen mask with a 0
    items = random_pairs(2, [(1, 6, 2), (9, 2, 11), (4, 4, 4), (3, 12, 1)])
    ids, mask = data.collate_pairs(items, pad_id=39)
    packed = pack_pairs(items)
    assert len(packed.ids) == sum(len(x["prompt"]) + len(x["chosen"]) + len(x["rejected"])
                                  for x in items) < ids.numel()  # each token once, no pads
    results = []
    for compute in (lambda: concatenated_logps(model, ids, mask, chunked_head),
                    lambda: packed_logps(model, packed, chunked_head)):
        model.zero_grad()
        logps, n_tokens = compute()
        (logps.chosen * torch.arange(1.0, 5.0) - logps.rejected).sum().backward()
        results.append((logps, n_tokens, [p.grad.clone() for p in model.parameters()]))
    (plain, plain_n, plain_grads), (packed_lp, packed_n, packed_grads) = results
    assert torch.equal(plain_n.chosen, packed_n.chosen)
    assert torch.equal(plain_n.rejected, packed_n.rejected)
    assert (plain.chosen - packed_lp.chosen).abs().max() < 1e-5
    assert (plain.rejected - packed_lp.rejected).abs().max() < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(plain_grads, packed_grads)) < 1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunked_token_logps_matches_log_softmax_values_and_gradients(dtype):
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 37, (50,))
    upstream = torch.randn(50)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    with ctx:
        plain = (hidden @ weight.t()).float().log_softmax(-1).gather(-1, targets[:, None])
    plain = plain.squeeze(-1)
    (plain * upstream).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    with ctx:
        chunked = ChunkedTokenLogps.apply(hidden, weight, targets, 7)  # 8 chunks
    (chunked * upstream).sum().backward()
    # bf16: the values differ by ~2e-6; the weight's gradient, summed over chunks in fp32
    # rather than in one bf16 matmul, by 0.3% of its largest entry: 1% lets that through
    # and stops a 4% scale error
    tol, rel = (1e-5, 1e-5) if dtype == "float32" else (1e-4, 1e-2)
    assert chunked.dtype == torch.float32
    assert (chunked - plain).abs().max() < tol
    assert (hidden.grad - grads[0]).abs().max() <= rel * grads[0].abs().max()
    assert (weight.grad - grads[1]).abs().max() <= rel * grads[1].abs().max()


def test_the_heads_gather_gives_indexings_values_and_gradients():
    """model.finish gathers the loss's positions with index_select (its backward,
    index_add_, is faster on CPU than x[head_at]'s index_put_; docs/performance.md): the
    same logits and gradients as indexing, positions repeated or not."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=40, dim=32, n_layers=1, n_heads=4,
                                    n_kv_heads=2, max_seq_len=64))
    hidden = torch.randn(3, 10, 32)
    head_at = torch.tensor([0, 4, 4, 9, 13, 29, 2, 29])
    weight = torch.randn(8, 40)
    results = []
    for gather in (lambda h: model.finish(h, head_at),
                   lambda h: model.output(model.norm(h).reshape(-1, 32)[head_at].float())):
        h = hidden.clone().requires_grad_(True)
        model.zero_grad()
        logits = gather(h)
        (logits * weight).sum().backward()
        results.append((logits.detach(), h.grad, [p.grad.clone() for p in model.parameters()
                                                  if p.grad is not None]))
    (a, ha, wa), (b, hb, wb) = results
    assert torch.equal(a, b) and len(wa) == len(wb) == 2  # the norm's gain, the head
    assert (ha - hb).abs().max() < 1e-6
    assert max((x - y).abs().max().item() for x, y in zip(wa, wb)) < 1e-6
