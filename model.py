"""A MiniMind-style decoder-only Transformer, its KV-cache generation, and checkpoints.

Pre-norm blocks: RMSNorm (in fp32) -> grouped-query attention with rotary
position embeddings -> residual; RMSNorm -> SwiGLU feed-forward -> residual.
No biases, tied input/output embeddings, dropout 0 by default. Two options exist
for MiniMind's checkpoints (convert.py), off in the plain path: per-head q/k
RMSNorm (`qk_norm`) and a mixture-of-experts feed-forward (`n_experts`).

    python model.py --preset minimind     prints the shape and parameter count

References: RMSNorm, Zhang & Sennrich 2019 (arXiv:1910.07467); RoPE, Su et al.
2021 (arXiv:2104.09864); GQA, Ainslie et al. 2023 (arXiv:2305.13245);
SwiGLU, Shazeer 2020 (arXiv:2002.05202).
"""

import argparse
import io
import math
import os
import pickle
import re
import tempfile
import zipfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import ArgumentParser, UserError, run_main
from loss import chunked_token_logps


@dataclass
class ModelConfig:
    vocab_size: int = 1536
    dim: int = 192  # C, the model width
    n_layers: int = 4
    n_heads: int = 6  # H query heads
    n_kv_heads: int = 2  # key/value heads; each serves n_heads // n_kv_heads query heads
    ffn_dim: int = 0  # SwiGLU hidden size; 0 = MiniMind's rule (8/3 * dim, up to x64)
    max_seq_len: int = 1024  # longest sequence RoPE tables are built for
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    dropout: float = 0.0
    # MiniMind's options (off in the plain path):
    qk_norm: bool = False  # RMSNorm over each head's queries and keys, before RoPE
    n_experts: int = 0  # > 0: a mixture-of-experts feed-forward (MoEFeedForward)
    experts_per_token: int = 2  # k, the experts each token is routed to
    aux_loss_coef: float = 5e-4  # weight of the router's load-balancing loss (MiniMind's)

    def __post_init__(self):
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise UserError(f"dim ({self.dim}) must divide by n_heads ({self.n_heads}) and "
                             f"n_heads by n_kv_heads ({self.n_kv_heads})")
        if self.ffn_dim == 0:
            self.ffn_dim = 64 * math.ceil(int(self.dim * 8 / 3) / 64)
        if self.n_experts and not 1 <= self.experts_per_token <= self.n_experts:
            raise UserError(f"experts_per_token ({self.experts_per_token}) must be 1.."
                             f"n_experts ({self.n_experts})")


PRESETS = {
    # CPU demo: ~1.9M parameters with the TinyChat tokenizer; SFT in minutes on 2 cores.
    "tiny": dict(dim=192, n_layers=4, n_heads=6, n_kv_heads=2, max_seq_len=1024),
    # MiniMind2-Small's shape: ~25.8M parameters with a 6400 vocabulary.
    "minimind": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, max_seq_len=2048),
    # Today's MiniMind code (model_minimind.py defaults): ~63.9M parameters with 6400 words;
    # FFN ceil(768 pi / 64) * 64 = 2432, RMSNorm eps 1e-6, q/k-norm.
    "minimind-768": dict(dim=768, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=2432,
                         norm_eps=1e-6, qk_norm=True, max_seq_len=32768),
    # Its MoE variant: 4 experts of that FFN size, 1 per token (MiniMind's defaults).
    "minimind-768-moe": dict(dim=768, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=2432,
                             norm_eps=1e-6, qk_norm=True, max_seq_len=32768, n_experts=4,
                             experts_per_token=1),
}


def make_config(preset="tiny", **overrides):
    """A ModelConfig from a named preset; overrides that are None are ignored."""
    values = dict(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(**values)


def add_model_args(parser):
    """Command-line flags for the model shape: --preset and one flag per ModelConfig field."""
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                        help="named model shape; the flags below override single fields")
    for f in fields(ModelConfig):
        if f.name == "vocab_size":
            continue  # always taken from the tokenizer
        flag, help = "--" + f.name.replace("_", "-"), f"override {f.name} (default: the preset's)"
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=help)
        else:
            parser.add_argument(flag, type=type(f.default), default=None, help=help)


def config_from_args(args, vocab_size):
    overrides = {f.name: getattr(args, f.name) for f in fields(ModelConfig)
                 if f.name != "vocab_size"}
    return make_config(args.preset, vocab_size=vocab_size, **overrides)

# ----------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 whatever the input dtype."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)


def rope_tables(head_dim, max_seq_len, theta):
    """cos and sin tables, each (max_seq_len, head_dim), for rotate-half RoPE."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)  # (D/2,)
    angles = torch.outer(torch.arange(max_seq_len).float(), inv_freq)  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate channel pairs (i, i + D/2) of x (B, H, T, D) by position-dependent angles."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, D/2) each
    rotated = torch.cat([-x2, x1], dim=-1)  # (B, H, T, D)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache:
    """Keys and values of every layer for generation, preallocated to max_len positions."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        head_dim = config.dim // config.n_heads
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # positions filled so far (advanced by the model after each forward)

    def update(self, layer, k, v):
        """Store k, v (B, Hkv, T, D) at the next positions; return all keys/values so far."""
        T = k.shape[2]
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        end = self.pos + T
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, Hkv, S, D)


class Attention(nn.Module):
    """Causal grouped-query self-attention on F.scaled_dot_product_attention.

    Padding is always on the right and padded positions are masked out of every
    loss, so a plain causal mask suffices: a real token never attends to a pad.
    """

    def __init__(self, config, layer):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.head_dim = config.dim // config.n_heads
        kv_dim = self.n_kv_heads * self.head_dim
        # q, k and v projections fused into one matmul; split after.
        self.wqkv = nn.Linear(config.dim, config.dim + 2 * kv_dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.dropout = config.dropout
        if config.qk_norm:  # MiniMind: each head's q and k RMS-normalised before RoPE
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.qk_norm = config.qk_norm

    def forward(self, x, cos, sin, cache=None, rows=None):
        qkv = self.wqkv(x)  # (B, T, C + 2 kv_dim)
        if rows is not None:  # packed (--packed): (N, .) distinct tokens -> (B, T, .) rows
            qkv = qkv[rows.index]
        B, T, _ = qkv.shape
        C, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = qkv.split([C, kv_dim, kv_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)  # over D, each head and position
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start = 0
        if cache is not None:
            start = cache.pos
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, S, D), S = start + T
        repeat = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(repeat, dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(repeat, dim=1)  # (B, H, S, D)
        if start == 0:  # no earlier positions: the usual causal mask
            mask, causal = None, True
        elif T == 1:  # one new token attends to everything cached
            mask, causal = None, False
        else:  # new tokens at positions start..start+T-1 over S keys
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
            causal = False
        fp32_attention = x.device.type == "cpu" and q.dtype == torch.bfloat16
        if fp32_attention:
            # PyTorch's CPU flash-attention kernel is ~3x slower in bf16 than in fp32
            # (forward + backward at TinyChat's shapes; README, Performance): on CPU the
            # attention itself runs in fp32 (autocast off, or it casts back to bf16), the
            # projections around it stay in bf16.
            q, k, v = q.float(), k.float(), v.float()
        with torch.autocast(x.device.type, enabled=False) if fp32_attention else nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        if rows is not None:  # packed: each distinct token's output, read from one row
            y = y.reshape(B * T, C)[rows.back]  # (N, C)
        return self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), with w1 and w3 fused into one matmul."""

    def __init__(self, config):
        super().__init__()
        self.w13 = nn.Linear(config.dim, 2 * config.ffn_dim, bias=False)
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)  # (B, T, F) each
        return self.dropout(self.w2(F.silu(gate) * up))  # (B, T, C)


class MoEFeedForward(nn.Module):
    """Mixture of experts (Shazeer et al. 2017, arXiv:1701.06538), MiniMind's option:
    n_experts SwiGLU feed-forwards and a router. Each token goes to the k =
    experts_per_token experts with the highest router probability, and their outputs are
    mixed with those probabilities renormalised over the k chosen.

    Worked routing example, 3 experts, k = 2: router probabilities [0.5, 0.3, 0.2] pick
    experts 0 and 1 with weights 0.5 / 0.8 = 0.625 and 0.3 / 0.8 = 0.375, so the token's
    output is 0.625 * expert_0(x) + 0.375 * expert_1(x); expert 2 never sees it.

    Load balancing (as MiniMind computes it, after Switch Transformer, Fedus et al. 2021,
    arXiv:2101.03961): aux = coef * E * sum_e load_e * P_e, where load_e is the share of
    tokens that picked expert e (the k picks of a token each count: the loads sum to k)
    and P_e the mean router probability of e. Routing every token to one expert costs
    more than spreading them. Each forward leaves its value in self.aux_loss.
    """

    def __init__(self, config):
        super().__init__()
        self.k, self.coef = config.experts_per_token, config.aux_loss_coef
        self.router = nn.Linear(config.dim, config.n_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(config) for _ in range(config.n_experts))
        self.aux_loss = None

    def forward(self, x):
        shape = x.shape  # (B, T, C), or (N, C) packed
        x = x.reshape(-1, shape[-1])  # (N, C): every token on its own
        probs = self.router(x).float().softmax(dim=-1)  # (N, E)
        weights, chosen = probs.topk(self.k, dim=-1)  # (N, k) each
        weights = weights / weights.sum(dim=-1, keepdim=True)  # renormalised over the k
        y = torch.zeros_like(x)  # (N, C)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)  # the tokens routed to expert e
            # (an expert with no token still runs on 0 rows: every parameter is in the graph)
            y.index_add_(0, token, expert(x[token]) * weights[token, slot, None].to(x.dtype))
        load = F.one_hot(chosen, len(self.experts)).float().sum(dim=1).mean(dim=0)  # (E,)
        self.aux_loss = self.coef * len(self.experts) * (load * probs.mean(dim=0)).sum()
        return y.view(shape)


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config, layer)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn = MoEFeedForward(config) if config.n_experts else FeedForward(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, cache=None, rows=None):
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), cos, sin, cache, rows))
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight  # tied embeddings
        cos, sin = rope_tables(config.dim // config.n_heads, config.max_seq_len,
                               config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # derived, not saved
        self.register_buffer("rope_sin", sin, persistent=False)
        self.aux_loss = None  # set by each forward: MoE load balancing, 0 for a dense model
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections
            if name.endswith("wo.weight") or name.endswith("w2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, cache=None, positions=None, labels=None, rows=None):
        """idx (B, T) token ids -> logits (B, T, V).

        positions, a bool (B, T) mask, keeps only the rows a loss needs: the output head,
        the costliest matmul at this size, then runs at those N positions only and the
        logits are (N, V), row by row. labels (N,) with positions selects the opt-in
        chunked head: log p(label) (N,), the same numbers as log_softmax of the logits,
        without holding them (loss.ChunkedTokenLogps).

        rows (opt-in --packed, data.PackedPairs): idx is then (N,), each distinct token
        once (a pair's prompt once for chosen and rejected, no padding); everything but
        attention runs on those N tokens, attention on the (R, T) rows rows.index
        gathers; positions is then an index (M,) into the N tokens."""
        T = idx.shape[-1] if rows is None else rows.index.shape[1]
        start = 0 if cache is None else cache.pos
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens is longer than max_seq_len "
                             f"{self.config.max_seq_len}")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]  # (T, D)
        x = self.dropout(self.tok_embeddings(idx))  # (B, T, C), or (N, C) packed
        for block in self.layers:
            x = block(x, cos, sin, cache, rows)
        if cache is not None:
            cache.pos += T
        # MoE: the routers' load-balancing loss of this forward, for the trainers to add
        self.aux_loss = (sum(block.ffn.aux_loss for block in self.layers)
                         if self.config.n_experts else x.new_zeros((), dtype=torch.float32))
        x = self.norm(x)  # (B, T, C)
        if positions is not None:
            x = x[positions]  # (N, C)
        if labels is not None:
            return chunked_token_logps(x, self.output.weight, labels)  # (N,)
        return self.output(x)  # (B, T, V), or (N, V) with positions

    def num_params(self):
        """Parameters, counting the tied embedding once."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 stop_id=None, generator=None):
        """Continue each row of idx (B, T) by up to max_new_tokens tokens with a KV cache.

        temperature 0 is greedy decoding; top_k keeps the k most likely tokens; top_p
        keeps the smallest set whose probability reaches p. A row stops at stop_id
        (included). Returns a list of B lists of new token ids.
        """
        B, T = idx.shape
        max_len = min(T + max_new_tokens, self.config.max_seq_len)
        cache = KVCache(self.config, B, max_len, idx.device, self.tok_embeddings.weight.dtype)
        logits = self(idx, cache=cache)[:, -1, :]  # (B, V)
        new_ids = []  # one (B,) tensor per step, left on the device: no sync per token
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for i in range(max_len - T):
            next_id = sample_next(logits.float(), temperature, top_k, top_p, generator)  # (B,)
            new_ids.append(next_id)
            if stop_id is not None:
                done |= next_id == stop_id
                if i % 16 == 15 and done.all():  # one look every 16 tokens: a host sync
                    break
            if cache.pos >= max_len:
                break
            logits = self(next_id[:, None], cache=cache)[:, -1, :]  # (B, V)
        if not new_ids:
            return [[] for _ in range(B)]
        rows = torch.stack(new_ids, dim=1).tolist()  # (B, L): one copy to the host
        if stop_id is None:
            return rows
        return [row[:row.index(stop_id) + 1] if stop_id in row else row for row in rows]


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id per row of logits (B, V): argmax at temperature 0, else a sample."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # (B, V)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the first token past p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


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


def optimizer_step(model, optimizer, scaler, grad_clip):
    """Unscale, clip, step; a step with non-finite gradients is skipped, never applied.

    Returns (grad_norm, skipped). With float16 the GradScaler skips such a step by itself
    and lowers its scale; otherwise (scaler disabled) we skip it here. grad_clip 0 means
    no clipping (the norm is still measured). The gradients are zeroed either way.
    """
    scaler.unscale_(optimizer)  # a no-op when the scaler is disabled
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    grad_norm = grad_norm.item()
    skipped = not math.isfinite(grad_norm)
    if scaler.is_enabled() or not skipped:
        scaler.step(optimizer)  # = optimizer.step() when the scaler is disabled
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped

# ----------------------------------------------------------------------------
# Checkpoints: plain tensors and primitives only, written atomically, read strictly.


CHECKPOINT_FORMAT = 1  # raise when the layout changes; newer files are refused with a reason


def atomic_write(path, payload):
    """Write bytes to path so that a crash or power loss leaves either the old file or the
    new one, never a part: a new temporary file in the same folder (mkstemp: created, never
    followed through a planted link), flushed and fsync'ed, then os.replace, then an fsync
    of the folder so the rename itself is on disk."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_tensors(obj, path):
    """torch.save, atomically (see atomic_write)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


def save_checkpoint(path, model, tokenizer, train_state=None):
    """Write {"model": fp32 state dict, "config": dict, "tokenizer": identity, ...} to path
    atomically: a crash never leaves a half-written file."""
    ckpt = {"format": CHECKPOINT_FORMAT,
            "model": {k: v.detach().float().cpu() for k, v in model.state_dict().items()},
            "config": asdict(model.config), "tokenizer": dict(tokenizer)}
    if train_state is not None:
        ckpt["train_state"] = train_state
    save_tensors(ckpt, path)


SAFE_TORCH = (2, 6)  # torch.load(weights_only=True) can be escaped to run code before 2.6


def check_zip_entries(path):
    """torch.save writes its zip entries stored, not compressed: refuse compressed ones,
    which could inflate a small file into gigabytes before any other check."""
    try:
        with zipfile.ZipFile(path) as z:
            entries = z.infolist()
    except zipfile.BadZipFile as e:
        raise UserError(f"{path}: the checkpoint is corrupt or cut short (a partial copy or "
                        f"download?): {e}") from None
    packed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise UserError(f"{path}: not written by torch.save (compressed entries, e.g. "
                        f"{packed[0]}); refusing to inflate it")


def load_checkpoint(path):
    """Read a checkpoint with torch.load(weights_only=True). Anything else is a UserError
    that names the file and says what is wrong: empty, not a checkpoint, corrupt or cut
    short, holding pickled objects (refused: loading them could run code), or written by
    a newer minidpo."""
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) < SAFE_TORCH:
        raise UserError(f"torch {torch.__version__} cannot load checkpoints safely "
                        "(weights_only can be escaped before 2.6): pip install 'torch>=2.6'")
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if not magic:
        raise UserError(f"{path}: the file is empty (0 bytes), not a checkpoint")
    is_zip = magic == b"PK\x03\x04"  # what torch.save writes
    is_pickle = len(magic) > 1 and magic[0] == 0x80 and 2 <= magic[1] <= 5  # may hold objects
    if not (is_zip or is_pickle):
        raise UserError(f"{path}: not a minidpo checkpoint (not a file written by torch.save)")
    if is_zip:
        check_zip_entries(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refusing to load a checkpoint that holds pickled objects "
                         f"other than tensors and plain values ({str(e).splitlines()[0]})"
                         ) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as e:
        raise UserError(f"{path}: the checkpoint is corrupt or cut short (a partial copy or "
                         f"download?): {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{path}: not a minidpo checkpoint (no 'model' entry)")
    if ckpt.get("format", 1) > CHECKPOINT_FORMAT:
        raise UserError(f"{path}: written by a newer minidpo (checkpoint format "
                         f"{ckpt['format']}; this version reads up to {CHECKPOINT_FORMAT})")
    for key in ("config", "tokenizer"):
        if key not in ckpt:
            raise UserError(f"{path}: not a minidpo checkpoint (no '{key}')")
    return ckpt


def check_tokenizer(ckpt, tokenizer, path=""):
    """Refuse a checkpoint trained with another tokenizer than the data's."""
    if ckpt["tokenizer"] != dict(tokenizer):
        raise UserError(f"{path}: checkpoint was trained with a different tokenizer "
                         f"(checkpoint: {ckpt['tokenizer']}, data: {dict(tokenizer)})")


def config_from_checkpoint(ckpt, path=""):
    """The ModelConfig a checkpoint describes, checked before anything is allocated: only
    ModelConfig's fields, each of its type, and the shape's own rules."""
    config, known = ckpt["config"], {f.name: f for f in fields(ModelConfig)}
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a minidpo checkpoint ('config' is not a dict)")
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise UserError(f"{path}: unknown config keys {unknown} (not a minidpo checkpoint, or "
                        "from another version)")
    for name, value in config.items():
        kind = type(known[name].default)
        if not (isinstance(value, kind) or (kind is float and isinstance(value, int))) or (
                kind is int and isinstance(value, bool)):
            raise UserError(f"{path}: config {name} must be {kind.__name__}, got {value!r}")
    try:
        return ModelConfig(**config)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def model_from_checkpoint(ckpt, path=""):
    """Build the Transformer a checkpoint describes and load its weights strictly. Keys
    and shapes are compared on the meta device first (no memory), so a checkpoint whose
    config asks for a huge model but holds small tensors is refused before allocating."""
    config = config_from_checkpoint(ckpt, path)
    weights = ckpt["model"]
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise UserError(f"{path}: not a minidpo checkpoint ('model' is not a dict of tensors)")
    # Layers and experts are Python objects even on the meta device: count them first
    for name, pattern in (("n_layers", r"layers\.(\d+)\."), ("n_experts", r"\.experts\.(\d+)\.")):
        found = {int(m.group(1)) for k in weights if (m := re.search(pattern, k))}
        if getattr(config, name) != len(found):
            raise UserError(f"{path}: config {name} is {getattr(config, name)}, the weights "
                            f"have {len(found)}")
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Transformer(config).state_dict().items()}
    if set(expected) != set(weights):
        raise UserError(f"{path}: checkpoint does not match the model: missing keys "
                        f"{sorted(set(expected) - set(weights))}, unexpected keys "
                        f"{sorted(set(weights) - set(expected))}")
    wrong = [f"{k} {tuple(weights[k].shape)} (expected {tuple(shape)})"
             for k, shape in expected.items() if weights[k].shape != shape]
    if wrong:
        raise UserError(f"{path}: checkpoint does not match its config: {', '.join(wrong[:3])}")
    model = Transformer(config)
    model.load_state_dict(weights, strict=True)
    return model


def main():
    parser = ArgumentParser(description="Print a model shape and its size.")
    add_model_args(parser)
    parser.add_argument("--vocab-size", type=int, default=6400, help="vocabulary size")
    args = parser.parse_args()
    config = config_from_args(args, args.vocab_size)
    print(config)
    print(f"parameters: {Transformer(config).num_params():,}")


if __name__ == "__main__":
    run_main(main)
