"""The Transformer: causality, KV-cache generation, RoPE, size, checkpoints, SFT loss."""

import math
import pickle

import pytest
import torch

from extras.chunked_head import chunked_head_for
from loss import sequence_logps
from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from model import ModelConfig, Transformer, apply_rope, make_config, rope_tables
from sample import generate

SMALL = {  # the presets' head layouts at small widths, so the tests take seconds
    "tiny": dict(vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, max_seq_len=64),
    "minimind": dict(vocab_size=97, dim=64, n_layers=2, n_heads=8, n_kv_heads=2,
                     max_seq_len=64),
}
TOKENIZER = {"sha256": "test", "vocab_size": 97}


def small_model(shape="tiny", seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**SMALL[shape])).eval()


@pytest.mark.parametrize("shape", sorted(SMALL))
def test_causality(shape):
    torch.manual_seed(0)
    model = small_model(shape)
    x = torch.randint(0, 97, (2, 20))
    t = 11
    y = x.clone()
    y[:, t + 1:] = torch.randint(0, 97, (2, 20 - t - 1))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-6)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:], atol=1e-3)


def greedy_by_full_forward(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("shape", sorted(SMALL))
def test_kv_cache_greedy_equals_full_reforward(shape):
    model = small_model(shape, seed=1)
    g = torch.Generator().manual_seed(0)
    for length in (1, 5, 13):
        prompt = torch.randint(0, 97, (length,), generator=g).tolist()
        cached = generate(model, torch.tensor([prompt]), 20, temperature=0)[0]
        assert cached == greedy_by_full_forward(model, prompt, 20)


def test_generate_stops_at_stop_id_and_batches_rows():
    model = small_model()
    prompt = torch.randint(0, 97, (3, 6), generator=torch.Generator().manual_seed(2))
    free = generate(model, prompt, 12, temperature=0)
    stop = free[0][4]
    stopped = generate(model, prompt, 12, temperature=0, stop_id=stop)
    assert stopped[0] == free[0][:free[0].index(stop) + 1]
    for row, out in zip(prompt.tolist(), free):
        assert out == greedy_by_full_forward(model, row, 12)


def test_sampling_with_top_k_one_is_greedy():
    model = small_model()
    prompt = torch.tensor([[1, 2, 3]])
    g = torch.Generator().manual_seed(0)
    assert generate(model, prompt, 10, temperature=1.0, top_k=1, generator=g) == \
        generate(model, prompt, 10, temperature=0)
    assert generate(model, prompt, 10, temperature=1.0, top_p=1e-6, generator=g) == \
        generate(model, prompt, 10, temperature=0)


def test_rope_dot_product_depends_only_on_offset():
    torch.manual_seed(0)
    D = 16
    cos, sin = rope_tables(D, 64, 1e6)
    q, k = torch.randn(D), torch.randn(D)

    def rotated_dot(m, n):
        qm = apply_rope(q.view(1, 1, 1, D), cos[m:m + 1], sin[m:m + 1])
        kn = apply_rope(k.view(1, 1, 1, D), cos[n:n + 1], sin[n:n + 1])
        return (qm * kn).sum().item()

    for offset in (0, 1, 7, 30):
        values = [rotated_dot(m + offset, m) for m in (0, 3, 10, 25)]
        assert max(values) - min(values) < 1e-4, values
    assert abs(rotated_dot(5, 0) - rotated_dot(0, 0)) > 1e-3


def test_minimind_parameter_count():
    c = make_config("minimind", vocab_size=6400)
    V, C, L, H, KV = 6400, 512, 8, 8, 2
    head = C // H
    ffn = 64 * -(-int(C * 8 / 3) // 64)  # MiniMind: 8/3 * C rounded up to a multiple of 64
    assert ffn == c.ffn_dim == 1408
    attention = C * (H * head) + 2 * C * (KV * head) + (H * head) * C
    per_layer = attention + 3 * C * ffn + 2 * C  # + two RMSNorm gains
    expected = V * C + L * per_layer + C  # tied embedding counted once, final norm
    assert Transformer(c).num_params() == expected == 25_829_888
    tiny = Transformer(make_config("tiny", vocab_size=1536)).num_params()
    assert 1_000_000 <= tiny <= 3_000_000


def test_checkpoint_round_trip_and_strict_loading(tmp_path):
    model = small_model()
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, model, TOKENIZER, {"step": 3})
    ckpt = load_checkpoint(path)
    assert ckpt["train_state"]["step"] == 3 and ckpt["tokenizer"] == TOKENIZER
    loaded = model_from_checkpoint(ckpt).eval()
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    missing = dict(ckpt, model={k: v for k, v in ckpt["model"].items()
                                if k != "norm.weight"})
    with pytest.raises(ValueError, match="missing keys.*norm.weight"):
        model_from_checkpoint(missing)
    extra = dict(ckpt, model={**ckpt["model"], "bonus.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected keys.*bonus.weight"):
        model_from_checkpoint(extra)


class Payload:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_checkpoint_with_pickled_object_is_refused(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"model": {}, "config": {}, "tokenizer": {}, "x": Payload()}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        load_checkpoint(path)
    with open(tmp_path / "evil2.pt", "wb") as f:
        pickle.dump(Payload(), f, protocol=2)
    with pytest.raises(ValueError, match="refusing to load"):
        load_checkpoint(str(tmp_path / "evil2.pt"))


def test_sft_loss_counts_only_assistant_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)  # (B, T, V)
    labels = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 1, 2]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1]])  # prompt 0, assistant 1

    def loss(lab):
        logps, n = sequence_logps(logits, lab, mask)
        return -logps.sum() / n.sum()

    base = loss(labels)
    changed_prompt = labels.clone()
    changed_prompt[0, 1], changed_prompt[1, 0], changed_prompt[0, 5] = 9, 3, 0
    assert torch.equal(loss(changed_prompt), base)
    changed_answer = labels.clone()
    changed_answer[0, 3] = 9
    assert not torch.equal(loss(changed_answer), base)
    log_probs = logits.log_softmax(-1)
    by_hand = -(log_probs[0, 2, 4] + log_probs[0, 3, 5] + log_probs[1, 1, 9]
                + log_probs[1, 2, 10] + log_probs[1, 3, 1] + log_probs[1, 4, 2]) / 6
    assert torch.allclose(base, by_hand)


def test_cpu_bf16_autocast_runs_attention_in_fp32(monkeypatch):
    """CPU's bf16 flash-attention kernel is ~3x slower than fp32 (README, Performance), so
    under CPU bf16 autocast the attention gets fp32 q, k, v; the projections stay bf16."""
    import model as model_module
    seen = []
    real = model_module.F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=40, dim=32, n_layers=1, n_heads=4, n_kv_heads=2))
    ids = torch.randint(0, 40, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    assert seen == [(torch.float32, False)] and logits.dtype == torch.float32  # fp32 head
    # bf16 rounding: 0.0022 here; halving the attention's output would give 0.067
    assert (logits - model(ids)).abs().max() < 0.01


@pytest.mark.parametrize("chunked", [False, True])
def test_the_output_head_runs_in_fp32_under_bf16_autocast(chunked):
    """The logits never pass through bf16: on the same hidden states, the head's
    log-probs under bf16 autocast equal fp32's. With the head in bf16 they were off by
    ~0.01 nats a token here (logits of a few units; 0.001 on TinyChat's SFT model)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=300, dim=64, n_layers=1, n_heads=4,
                                    n_kv_heads=2))
    torch.nn.init.normal_(model.tok_embeddings.weight, std=1.0)  # logits of a few units
    hidden = torch.randn(2, 24, 64)
    labels = torch.randint(0, 300, (48,))
    at = torch.arange(48)
    head = chunked_head_for(labels) if chunked else None

    def logps():
        out = model.finish(hidden, at, head)
        return out if chunked else out.log_softmax(-1).gather(-1, labels[:, None])[:, 0]

    fp32 = logps()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = logps()
    assert bf16.dtype == torch.float32
    assert (bf16 - fp32).abs().max() < 1e-5, (bf16 - fp32).abs().max()


def test_grouped_query_attention_equals_attention_written_out_with_kv_copied():
    """SDPA's enable_gqa (no K/V copy) against GQA written out (Ainslie et al. 2023): each
    K/V head copied for its H / Hkv query heads (query head h reads K/V head h // 3 here),
    then softmax(q k^T / sqrt(D)) v under the causal mask."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=40, dim=48, n_layers=1, n_heads=6,
                                    n_kv_heads=2)).eval()
    attn, (B, T) = model.layers[0].attn, (2, 11)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    qkv = attn.wqkv(torch.randn(B, T, 48))
    with torch.no_grad():
        y = attn.attend(qkv, cos, sin)  # (B, T, C)
        q, k, v = qkv.split([48, 16, 16], dim=-1)
        q = apply_rope(q.view(B, T, 6, 8).transpose(1, 2), cos, sin)  # (B, 6, T, 8)
        k = apply_rope(k.view(B, T, 2, 8).transpose(1, 2), cos, sin).repeat_interleave(3, 1)
        v = v.view(B, T, 2, 8).transpose(1, 2).repeat_interleave(3, 1)  # (B, 6, T, 8)
        scores = q @ k.transpose(-1, -2) / math.sqrt(8)  # (B, 6, T, T)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        expected = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, 48)
    assert (y - expected).abs().max() < 1e-5
