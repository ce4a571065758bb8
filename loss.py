"""Sequence log-probabilities, the DPO loss family, and the preference metrics.

DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model
is Secretly a Reward Model", arXiv:2305.18290) trains the policy pi_theta
directly on preference pairs (x, y_w, y_l), with a frozen reference pi_ref:

    L_DPO = -E[ log sigma( beta * h ) ],                                    (Eq. 7)
    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]

beta * (log pi(y|x) - log pi_ref(y|x)) is the implicit reward of y. Every
log pi(y|x) here is a SUM over the response tokens (not a mean).

Reading order: sequence_logps (the worked example) -> response_logps (the
same, as both trainers call it) -> concatenated_logps (DPO's pairs) -> dpo_loss.
Not run directly; train_sft.py and train_dpo.py use it.
"""

from collections import namedtuple

import torch
import torch.nn.functional as F

ChosenRejected = namedtuple("ChosenRejected", ["chosen", "rejected"])
LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "norm", "dpop", "simpo", "rdpo", "bco_pair",
              "nca_pair", "apo_zero", "sppo_hard", "orpo")
REFERENCE_FREE_LOSSES = ("simpo", "orpo")  # they never read the reference's log-probs
SMOOTHED_LOSSES = ("sigmoid", "robust", "simpo")  # the ones --label-smoothing acts on
# beta when --beta is not given: 2.0 was measured on TinyChat (README: Results); on other
# data the paper's 0.1 (Rafailov et al. 2023 used 0.1-0.5; TRL's default is 0.1)
TINYCHAT_BETA, PAPER_BETA = 2.0, 0.1
METRIC_NAMES = ("loss", "loss/dpo", "loss/nll", "loss/aux", "rewards/chosen", "rewards/rejected",
                "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")

# ----------------------------------------------------------------------------
# Log-probabilities


def sequence_logps(logits, labels, loss_mask):
    """Log-probability of each sequence's masked tokens: the SUM (not the mean) over
    response tokens of log p(token_t | tokens_<t), in fp32.

    logits (B, T, V) predict the next token, so position t-1 scores labels[t]:
    the logits are shifted left by one against labels and loss_mask. Returns
    (logps (B,), n_tokens (B,)), the token counts for per-token averages.

    Worked example, V = 2, one sequence labels = [0, 1, 1], loss_mask = [0, 1, 1]:
    logits[0] = [0, 0] gives p(labels[1] = 1) = 1/2, logits[1] = [0, ln 3] gives
    p(labels[2] = 1) = 3/4, and logits[2] predicts past the end (unused):

        >>> import math
        >>> logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3)], [5.0, -5.0]]])
        >>> logps, n_tokens = sequence_logps(logits, torch.tensor([[0, 1, 1]]),
        ...                                  torch.tensor([[0, 1, 1]]))
        >>> round(logps.item(), 5), round(math.log(1 / 2) + math.log(3 / 4), 5), n_tokens
        (-0.98083, -0.98083, tensor([2.]))
    """
    log_probs = logits[:, :-1].float().log_softmax(dim=-1)  # (B, T-1, V), in fp32
    labels, mask = labels[:, 1:], loss_mask[:, 1:].float()  # (B, T-1) each
    per_token = log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (per_token * mask).sum(-1), mask.sum(-1)  # (B,) SUM, not mean; (B,)


def head_logps(model, ids, positions, labels, chunked_head=False, rows=None):
    """log p(label) (N,) at the N positions the model's output head runs at, in fp32."""
    if chunked_head:
        return model(ids, positions=positions, labels=labels, rows=rows)  # (N,) fp32
    logits = model(ids, positions=positions, rows=rows).float()  # (N, V): N positions only
    # log_softmax(logits)[label] = -cross_entropy(logits, label): one fused kernel each way
    return -F.cross_entropy(logits, labels, reduction="none")


def response_logps(model, ids, loss_mask, chunked_head=False):
    """sequence_logps(model(ids), ids, loss_mask), computed with less work: the output
    head runs only where a response token is predicted. Both trainers use this.

    ids, loss_mask (B, T). Returns (logps (B,), n_tokens (B,)): summed log-probs of
    the masked tokens and their counts. chunked_head=True gives the same numbers
    without ever holding the (N, V) logits (ChunkedTokenLogps below): for large
    vocabularies.
    """
    targets = loss_mask[:, 1:].bool()  # (B, T-1): is token t+1 a response token?
    labels = ids[:, 1:][targets]  # (N,) the response tokens, row by row
    # Position t predicts token t+1, so the last token predicts nothing: leave it out.
    picked = head_logps(model, ids[:, :-1], targets, labels, chunked_head)  # (N,)
    per_token = torch.zeros(targets.shape, device=ids.device)  # (B, T-1)
    per_token = per_token.masked_scatter(targets, picked)  # back to its (row, position)
    return per_token.sum(-1), targets.sum(-1).float()  # (B,) SUM, not mean; (B,)


def concatenated_logps(model, ids, loss_mask, chunked_head=False):
    """One forward pass over chosen and rejected together: ids, loss_mask (2B, T) as
    data.collate_pairs lays them out, rows 0..B-1 chosen and rows B..2B-1 rejected.
    Returns (logps, n_tokens), each a ChosenRejected of (B,) tensors: summed response
    log-probs and response token counts, by name."""
    return split_chosen_rejected(*response_logps(model, ids, loss_mask, chunked_head))


def packed_logps(model, packed, chunked_head=False):
    """concatenated_logps of a data.PackedPairs batch (opt-in --packed): the same numbers
    (summed in another order), from a forward over each distinct token once."""
    picked = head_logps(model, packed.ids, packed.pred, packed.labels, chunked_head,
                        rows=packed)  # (M,)
    n_rows = packed.index.shape[0]  # 2B
    logps = picked.new_zeros(n_rows).index_add(0, packed.seq, picked)  # (2B,) SUM per row
    n_tokens = torch.bincount(packed.seq, minlength=n_rows).float()  # (2B,)
    return split_chosen_rejected(logps, n_tokens)


def split_chosen_rejected(logps, n_tokens):
    """(2B,) log-probs and token counts, rows 0..B-1 chosen and B..2B-1 rejected -> two
    ChosenRejected of (B,) tensors."""
    B = logps.shape[0] // 2
    return (ChosenRejected(chosen=logps[:B], rejected=logps[B:]),
            ChosenRejected(chosen=n_tokens[:B], rejected=n_tokens[B:]))


@torch.compiler.disable  # under --compile it runs eagerly: its Python loop over chunks
def chunked_token_logps(hidden, weight, labels):  # would recompile for every new N
    """ChunkedTokenLogps.apply(hidden, weight, labels): log p(label) (N,), fp32."""
    return ChunkedTokenLogps.apply(hidden, weight, labels)


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

# ----------------------------------------------------------------------------
# The DPO loss family


def choose_beta(beta, on_tinychat):
    """(beta, why): the --beta given, else TINYCHAT_BETA on TinyChat, else PAPER_BETA."""
    if beta is not None:
        return beta, "--beta"
    if on_tinychat:
        return TINYCHAT_BETA, "the default measured on TinyChat; --beta to change"
    return PAPER_BETA, "the DPO paper's, the default on data other than TinyChat; --beta to change"


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps, beta, loss_type="sigmoid", label_smoothing=0.0,
             chosen_n_tokens=None, rejected_n_tokens=None, dpop_lambda=50.0,
             simpo_gamma=0.5, rdpo_alpha=0.01, bco_delta=0.0):
    """Per-pair losses and detached rewards. All log-probs are (B,) SUMS over response
    tokens; the token counts (B,) are needed by the per-token variants. With r_w and
    r_l the log-ratios log pi(y|x) - log pi_ref(y|x) of the chosen and rejected answers,
    h = r_w - r_l, avg(.) a log-prob divided by its answer's token count, |y| that count:

      sigmoid  -log sigma(beta h)                      Rafailov et al. 2023, Eq. 7
               with label_smoothing eps (conservative DPO, Mitchell 2023):
               -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
      robust   [-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps), an
               unbiased loss under a share eps of flipped labels (Chowdhury et al. 2024,
               arXiv:2403.00409; eps = label_smoothing)
      ipo      (h_avg - 1/(2 beta))^2, h_avg: h from per-token AVERAGED log-probs
               (Azar et al. 2023, arXiv:2310.12036)
      hinge    max(0, 1 - beta h)   (SLiC-HF, Zhao et al. 2023, arXiv:2305.10425;
               RSO, Liu et al. 2023, arXiv:2309.06657)
      norm     -log sigma(beta h_avg): length-normalised DPO (Tulu 3, Lambert et al. 2024,
               arXiv:2411.15124)
      dpop     -log sigma(beta (h - lambda max(0, log pi_ref(y_w) - log pi(y_w)))): a
               penalty once the chosen answer falls below the reference (DPO-Positive,
               Smaug, Pal et al. 2024, arXiv:2402.13228; lambda = dpop_lambda)
      simpo    -log sigma(beta avg(log pi(y_w)) - beta avg(log pi(y_l)) - gamma): no
               reference, a target margin gamma (Meng et al. 2024, arXiv:2405.14734);
               label_smoothing eps as in conservative DPO (as TRL's CPO applies it)
      rdpo     -log sigma(beta h + alpha (|y_w| - |y_l|)) (R-DPO, Park et al. 2024,
               arXiv:2403.19159, Eq. 9): the reward a length-penalised judge would give
               is r - alpha |y|, so a chosen answer that is longer gets a smaller loss
               and gradient, one that wins by being shorter a larger one: no push to length
      bco_pair -log sigma(beta r_w - delta) - log sigma(-(beta r_l - delta)), delta a
               running mean of the rewards, kept by the trainer (Jung et al. 2024,
               arXiv:2404.04656)
      nca_pair -log sigma(beta r_w) - 1/2 log sigma(-beta r_w) - 1/2 log sigma(-beta r_l)
               (Chen et al. 2024, arXiv:2402.05369)
      apo_zero (1 - sigma(beta r_w)) + sigma(beta r_l): chosen up, rejected down, each on
               its own (D'Oosterlinck et al. 2024, arXiv:2408.06266)
      sppo_hard (r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2 (Wu et al. 2024,
               arXiv:2405.00675)
      orpo     -avg(log pi(y_w)) - beta log sigma(log odds(y_w) - log odds(y_l)), odds(y) =
               p / (1 - p) with p = exp(avg(log pi(y))); no reference (Hong et al. 2024,
               arXiv:2403.07691; beta is the paper's lambda)

    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)), the rewards
    detached: beta * (log pi(y|x) - log pi_ref(y|x)), the implicit reward of Eq. 5, for
    every loss but simpo and orpo, which log beta * avg(log pi(y|x)), the quantity their
    losses compare (SimPO's Eq. 4; TRL logs the same). Their margins and accuracies are
    therefore not comparable with the other losses'.

    tests/test_parity.py holds every loss TRL also has to TRL's own outputs
    (tests/fixtures/trl). For the two it lacks, worked examples from the papers' equations;
    R-DPO's Eq. 9 with r_w = -1, r_l = -3 (h = 2), |y_w| = 30, |y_l| = 10, beta 0.5,
    alpha 0.05 gives -log sigma(0.5 * 2 + 0.05 * 20) = -log sigma(2) = 0.12693:

        >>> import math
        >>> t = lambda *v: torch.tensor(v, dtype=torch.float64)
        >>> losses, _, _ = dpo_loss(t(-11.0), t(-23.0), t(-10.0), t(-20.0), beta=0.5,
        ...                         loss_type="rdpo", rdpo_alpha=0.05,
        ...                         chosen_n_tokens=t(30.0), rejected_n_tokens=t(10.0))
        >>> round(losses.item(), 5), round(math.log(1 + math.exp(-2.0)), 5)
        (0.12693, 0.12693)

    DPOP's Eq. 3 with the chosen answer 0.1 below the reference (r_w = -0.1, r_l = -1,
    h = 0.9), beta 1 and lambda 5: -log sigma(0.9 - 5 * 0.1) = -log sigma(0.4) = 0.51302;
    above the reference the penalty is 0 and it is plain DPO, -log sigma(0.9) = 0.34115:

        >>> losses, _, _ = dpo_loss(t(-10.1, -9.9), t(-21.0, -20.8), t(-10.0, -10.0),
        ...                         t(-20.0, -20.0), beta=1.0, loss_type="dpop", dpop_lambda=5.0)
        >>> [round(x, 5) for x in losses.tolist()]
        [0.51302, 0.34115]
        >>> round(math.log(1 + math.exp(-0.4)), 5), round(math.log(1 + math.exp(-0.9)), 5)
        (0.51302, 0.34115)
    """
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    h = pi_logratios - ref_logratios  # h_{pi_theta}^{y_w, y_l} in the paper, (B,)
    # The variants also name each answer's log-ratio and token count.
    r_w = policy_chosen_logps - reference_chosen_logps  # (B,)
    r_l = policy_rejected_logps - reference_rejected_logps  # (B,)
    n_w, n_l = chosen_n_tokens, rejected_n_tokens

    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)  # Eq. 7
        if label_smoothing > 0:  # conservative DPO: a share eps of the labels is flipped
            losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = ((1 - label_smoothing) * -F.logsigmoid(beta * h)
                  + label_smoothing * F.logsigmoid(-beta * h)) / (1 - 2 * label_smoothing)
    elif loss_type == "ipo":  # per-token averages: h_avg = h with each logps / its length
        losses = (r_w / n_w - r_l / n_l - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "norm":
        losses = -F.logsigmoid(beta * (r_w / n_w - r_l / n_l))
    elif loss_type == "dpop":
        losses = -F.logsigmoid(beta * (h - dpop_lambda * torch.relu(-r_w)))
    elif loss_type == "simpo":
        margin = beta * (policy_chosen_logps / n_w - policy_rejected_logps / n_l) - simpo_gamma
        losses = (-(1 - label_smoothing) * F.logsigmoid(margin)
                  - label_smoothing * F.logsigmoid(-margin))
    elif loss_type == "rdpo":
        losses = -F.logsigmoid(beta * h + rdpo_alpha * (n_w - n_l))  # + : Park et al. Eq. 9
    elif loss_type == "bco_pair":
        losses = -F.logsigmoid(beta * r_w - bco_delta) - F.logsigmoid(-(beta * r_l - bco_delta))
    elif loss_type == "nca_pair":
        losses = (-F.logsigmoid(beta * r_w) - 0.5 * F.logsigmoid(-beta * r_w)
                  - 0.5 * F.logsigmoid(-beta * r_l))
    elif loss_type == "apo_zero":
        losses = (1 - torch.sigmoid(beta * r_w)) + torch.sigmoid(beta * r_l)
    elif loss_type == "sppo_hard":
        losses = (r_w - 1 / (2 * beta)) ** 2 + (r_l + 1 / (2 * beta)) ** 2
    elif loss_type == "orpo":
        avg_w, avg_l = policy_chosen_logps / n_w, policy_rejected_logps / n_l
        log_odds = (avg_w - log1mexp(avg_w)) - (avg_l - log1mexp(avg_l))
        # The NLL term is each pair's token mean over its answer (TRL pools all chosen
        # tokens of the batch, the prompt's included): the same for equal-length answers.
        losses = -avg_w - beta * F.logsigmoid(log_odds)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose from {LOSS_TYPES}")

    if loss_type in ("simpo", "orpo"):  # the rewards their losses compare: averaged, no ref
        chosen_rewards = beta * (policy_chosen_logps / n_w).detach()
        rejected_rewards = beta * (policy_rejected_logps / n_l).detach()
    else:
        chosen_rewards, rejected_rewards = beta * r_w.detach(), beta * r_l.detach()
    return losses, chosen_rewards, rejected_rewards


def log1mexp(x):
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012): log(-expm1(x))
    near 0, log1p(-exp(x)) far below. x is clamped just under 0, where 1 - e^x is 0."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def preference_metrics(losses, chosen_rewards, rejected_rewards, policy_logps):
    """Batch means with TRL's names, as 0-dim tensors (no host sync here). policy_logps is
    the policy's ChosenRejected summed log-probs."""
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),  # strict
        "logps/chosen": policy_logps.chosen.detach().mean(),
        "logps/rejected": policy_logps.rejected.detach().mean(),
        "loss/dpo": losses.detach().mean(),
    }
