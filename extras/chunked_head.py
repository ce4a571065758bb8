"""--chunked-head: log p(label) at the response positions without ever holding the (N, V)
logits, for large vocabularies; the core's head step (loss.response_logps) hands the
hidden states to it in place of the output head. The same numbers: tests/test_loss.py
checks values and gradients against the plain path.
"""

import functools

import torch


def chunked_token_logps(hidden, weight, labels):
    """ChunkedTokenLogps.apply(hidden, weight, labels): log p(label) (N,), fp32."""
    return ChunkedTokenLogps.apply(hidden, weight, labels)


@functools.cache
def eager_chunked_token_logps():
    """chunked_token_logps, run eagerly under --compile (its Python loop over chunks would
    recompile for every new N). Made at first use, not as a decorator at import:
    torch.compiler.disable imports torch._dynamo, a second of every script's start-up."""
    return torch.compiler.disable(chunked_token_logps)


class ChunkedTokenLogps(torch.autograd.Function):
    """Opt-in (--chunked-head): log_softmax(hidden @ weight.T)[label] for each row of
    hidden (N, C), the same numbers, without ever holding the (N, V) logits.

    Forward makes the logits a chunk of rows at a time and keeps only each row's
    logsumexp; backward remakes one chunk's logits (one extra head matmul) and forms
    d/dlogits = onehot(label) - softmax(logits) in place. Worth it for large
    vocabularies, where (N, V) is the largest tensor of the step; tests/test_loss.py
    checks it against the plain path, values and gradients.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_rows=None):
        device_type = hidden.device.type
        dtype = (torch.get_autocast_dtype(device_type)
                 if torch.is_autocast_enabled(device_type) else hidden.dtype)
        ctx.dtype = dtype
        ctx.chunk = chunk_rows or max(64, 2 ** 21 // weight.shape[0])  # ~8 MB of fp32 logits
        out = torch.empty(hidden.shape[0], device=hidden.device)  # (N,)
        lse = torch.empty(hidden.shape[0], device=hidden.device)  # (N,)
        with torch.autocast(device_type, enabled=False):
            w = weight.to(dtype)
            for s in range(0, hidden.shape[0], ctx.chunk):
                logits = (hidden[s:s + ctx.chunk].to(dtype) @ w.t()).float()  # (n, V)
                lse[s:s + ctx.chunk] = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(-1, labels[s:s + ctx.chunk, None]).squeeze(-1)
                out[s:s + ctx.chunk] = picked - lse[s:s + ctx.chunk]
        ctx.save_for_backward(hidden, weight, labels, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, lse = ctx.saved_tensors
        dtype = ctx.dtype
        grad_hidden = torch.empty_like(hidden)  # (N, C)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)  # (V, C)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for s in range(0, hidden.shape[0], ctx.chunk):
                h = hidden[s:s + ctx.chunk].to(dtype)  # (n, C)
                g = grad_out[s:s + ctx.chunk, None].float()  # (n, 1)
                logits = (h @ w.t()).float()  # (n, V)
                grad = logits.sub_(lse[s:s + ctx.chunk, None]).exp_().mul_(-g)  # -g softmax
                grad.scatter_add_(1, labels[s:s + ctx.chunk, None], g)  # + g onehot
                grad = grad.to(dtype)
                grad_hidden[s:s + ctx.chunk] = (grad @ w).to(hidden.dtype)  # (n, C)
                grad_weight += (grad.t() @ h).float()  # (V, C)
        return grad_hidden, grad_weight.to(weight.dtype), None, None


def chunked_head_for(labels):
    """The head model.Transformer runs in place of its output layer: log p(label) (N,)."""
    logps = eager_chunked_token_logps()  # the same function every step: no recompiles
    return lambda hidden, output: logps(hidden, output.weight, labels)
