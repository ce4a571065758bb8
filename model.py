"""A MiniMind-style decoder-only Transformer (its KV-cache generation: sample.generate).

Pre-norm blocks: RMSNorm (in fp32) -> grouped-query attention with rotary
position embeddings -> residual; RMSNorm -> SwiGLU feed-forward -> residual.
No biases, tied input/output embeddings, dropout 0 by default. Two options exist
for MiniMind's checkpoints (tools/convert.py), off in the plain path: per-head q/k
RMSNorm (`qk_norm`) and a mixture-of-experts feed-forward (`n_experts`, extras/moe.py).
Checkpoints are read and written by checkpoint.py.

    python flags.py --preset minimind     prints the shape and parameter count

References: RMSNorm, Zhang & Sennrich 2019 (arXiv:1910.07467); RoPE, Su et al.
2021 (arXiv:2104.09864); GQA, Ainslie et al. 2023 (arXiv:2305.13245);
SwiGLU, Shazeer 2020 (arXiv:2002.05202).
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import UserError


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

    def forward(self, x, cos, sin, cache=None):
        y = self.attend(self.wqkv(x), cos, sin, cache)  # (B, T, C)
        return self.wo(y)

    def attend(self, qkv, cos, sin, cache=None):
        """Attention proper: the fused projections qkv (B, T, C + 2 kv_dim) -> (B, T, C)."""
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
        if start == 0:  # no earlier positions: the usual causal mask
            mask, causal = None, True
        elif T == 1:  # one new token attends to everything cached
            mask, causal = None, False
        else:  # new tokens at positions start..start+T-1 over S keys
            mask = torch.ones(T, start + T, dtype=torch.bool, device=qkv.device).tril(start)
            causal = False
        fp32_attention = qkv.device.type == "cpu" and q.dtype == torch.bfloat16
        if fp32_attention:
            # PyTorch's CPU flash-attention kernel is ~3x slower in bf16 than in fp32
            # (forward + backward at TinyChat's shapes; docs/performance.md): on CPU the
            # attention itself runs in fp32 (autocast off, or it casts back to bf16), the
            # projections around it stay in bf16.
            q, k, v = q.float(), k.float(), v.float()
        with (torch.autocast(qkv.device.type, enabled=False) if fp32_attention
              else nullcontext()):
            # enable_gqa: query head h reads K/V head h // (H / Hkv), with no copy of K/V
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               dropout_p=self.dropout if self.training else 0.0,
                                               enable_gqa=True)  # (B, H, T, D)
        return y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)


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


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config, layer)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn = FeedForward(config)
        if config.n_experts:  # MiniMind's mixture of experts instead (extras/moe.py)
            from extras.moe import MoEFeedForward
            self.ffn = MoEFeedForward(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), cos, sin, cache))
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

    def forward(self, idx, cache=None, head_at=None, head=None):
        """idx (B, T) token ids -> logits (B, T, V). cache: a sample.KVCache when generating.

        head_at, the positions a loss reads, as indices (N,) into the B * T positions of idx
        flattened: the output head, the costliest matmul at this size, then runs at those
        N only and the logits are (N, V). (loss.response_logps passes ids[:, :-1], the
        positions that predict a next token: its T is one less than the batch's.) head
        (hidden (N, C), output layer), if given, replaces the head (extras/chunked_head.py).
        """
        if not torch.is_tensor(idx):  # another batch layout (extras/packed.py) runs the
            return idx.forward(self, head_at, head)  # blocks its own way
        T = idx.shape[1]
        start = 0 if cache is None else cache.pos
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens is longer than max_seq_len "
                             f"{self.config.max_seq_len}")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]  # (T, D)
        x = self.dropout(self.tok_embeddings(idx))  # (B, T, C)
        for block in self.layers:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.pos += T
        return self.finish(x, head_at, head)

    def finish(self, x, head_at=None, head=None):
        """The last blocks' output x (B, T, C) -> fp32 logits (B, T, V), or (N, V) at
        head_at; the forward's load-balancing loss left in self.aux_loss (MoE; 0 if dense)."""
        aux = [block.ffn.aux_loss for block in self.layers if hasattr(block.ffn, "aux_loss")]
        self.aux_loss = sum(aux) if aux else x.new_zeros((), dtype=torch.float32)
        x = self.norm(x)  # (B, T, C)
        if head_at is not None:
            x = x.reshape(-1, x.shape[-1]).index_select(0, head_at)  # (N, C): loss positions
        # the head in fp32 even under autocast: bf16 logits would round each log-prob by
        # ~1e-3 nats (tests/test_model.py), and DPO's beta scales the sum over an answer
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            return self.output(x) if head is None else head(x, self.output)

    def num_params(self):
        """Parameters, counting the tied embedding once."""
        return sum(p.numel() for p in self.parameters())
