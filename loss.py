"""Sequence log-probabilities, the DPO loss family, and the preference metrics.

DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model
is Secretly a Reward Model", arXiv:2305.18290) trains the policy pi_theta
directly on preference pairs (x, y_w, y_l), with a frozen reference pi_ref:

    L_DPO = -E[ log sigma( beta * h ) ],                                    (Eq. 7)
    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]

beta * (log pi(y|x) - log pi_ref(y|x)) is the implicit reward of y. Every
log pi(y|x) here is a SUM over the response tokens (not a mean).

Reading order: sequence_logps (the worked example) -> response_logps (the
same, as both trainers call it) -> concatenated_logps (DPO's pairs) -> dpo_loss;
read_step, last, averages a step's metrics over the ranks.
Not run directly; train_sft.py and train_dpo.py use it.
"""

from collections import namedtuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from devices import to_device
from extras.chunked_head import chunked_head_for
from extras.losses import REFERENCE_FREE, SMOOTHED, VARIANTS

ChosenRejected = namedtuple("ChosenRejected", ["chosen", "rejected"])
# The DPO variants, a function each, in extras/losses.py: the one plug-in point for losses
LOSSES = {"sigmoid": None, "ipo": None, **VARIANTS}  # None: written out in dpo_loss
LOSS_TYPES = tuple(LOSSES)
REFERENCE_FREE_LOSSES = REFERENCE_FREE  # they never read the reference's log-probs
SMOOTHED_LOSSES = ("sigmoid", *SMOOTHED)  # the ones --label-smoothing acts on
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


def response_logps(model, ids, loss_mask, chunked_head=False):
    """sequence_logps(model(ids), ids, loss_mask), computed with less work: the output
    head runs only where a response token is predicted. Both trainers use this.

    ids (B, T) on the model's device; loss_mask (B, T) there too, or left on the CPU as
    both trainers leave it: the response positions are then found on the host, and no
    step waits for the GPU to find them. Returns (logps (B,), n_tokens (B,)): summed
    log-probs of the masked tokens and their counts. chunked_head=True gives the same
    numbers without ever holding the (N, V) logits (extras/chunked_head.py): for large
    vocabularies.
    """
    targets = loss_mask[:, 1:].bool()  # (B, T-1): is token t+1 a response token?
    # Position t predicts token t+1, so the last token predicts nothing: leave it out.
    at = to_device(targets.flatten().nonzero().squeeze(1), ids.device)  # (N,) of B*(T-1)
    labels = ids[:, 1:].flatten()[at]  # (N,) the response tokens, row by row
    picked = head_logps(model, ids[:, :-1], at, labels, chunked_head)  # (N,)
    per_token = picked.new_zeros(targets.numel()).scatter(0, at, picked)  # (B*(T-1),)
    n_tokens = to_device(targets.sum(-1).float(), ids.device)  # (B,)
    return per_token.view(targets.shape).sum(-1), n_tokens  # (B,) SUM, not mean; (B,)


def head_logps(model, ids, head_at, labels, chunked_head=False):
    """The head step: log p(label) (N,), in fp32, at the N positions head_at (N,) lists
    (indices into the flattened positions of ids). The blocks run over every position;
    the output head, the costliest matmul here, only where a response token is
    predicted."""
    if chunked_head:  # the same numbers without the (N, V) logits (extras/chunked_head.py)
        return model(ids, head_at=head_at, head=chunked_head_for(labels))  # (N,) fp32
    logits = model(ids, head_at=head_at).float()  # (N, V): N positions only
    # log_softmax(logits)[label] = -cross_entropy(logits, label): one fused kernel each way
    return -F.cross_entropy(logits, labels, reduction="none")


def concatenated_logps(model, ids, loss_mask, chunked_head=False):
    """One forward pass over chosen and rejected together: ids, loss_mask (2B, T) as
    data.collate_pairs lays them out, rows 0..B-1 chosen and rows B..2B-1 rejected.
    Returns (logps, n_tokens), each a ChosenRejected of (B,) tensors: summed response
    log-probs and response token counts, by name."""
    return split_chosen_rejected(*response_logps(model, ids, loss_mask, chunked_head))


def pair_logps(model, batch, packed=False, chunked_head=False):
    """(logps, n_tokens) of a data.pair_batch, each a ChosenRejected of (B,) tensors."""
    if packed:  # the packed layout runs its own forward (extras/packed.py)
        from extras.packed import packed_logps
        return packed_logps(model, batch, chunked_head)
    ids, mask = batch
    return concatenated_logps(model, ids, mask, chunked_head)


def reference_logps(reference, ref_table, idx, batch, device, packed=False,
                    chunked_head=False):
    """The reference's summed log-probs of the pairs idx (their batch: batch), as a
    ChosenRejected of (B,) tensors: a forward of the frozen reference with no graph kept
    (no gradient flows into it), 0 when there is no reference (--reference-free, and the
    losses that never read it), or looked up in ref_table with --precompute-ref."""
    if ref_table is not None:
        rows = to_device(ref_table[idx], device)  # (B, 2)
        return ChosenRejected(chosen=rows[:, 0], rejected=rows[:, 1])
    if reference is None:  # --reference-free: log pi_ref(y|x) taken as 0
        zeros = torch.zeros(len(idx), device=device)
        return ChosenRejected(chosen=zeros, rejected=zeros)
    with torch.no_grad():
        return pair_logps(reference, batch, packed, chunked_head)[0]


def split_chosen_rejected(logps, n_tokens):
    """(2B,) log-probs and token counts, rows 0..B-1 chosen and B..2B-1 rejected -> two
    ChosenRejected of (B,) tensors."""
    B = logps.shape[0] // 2
    return (ChosenRejected(chosen=logps[:B], rejected=logps[B:]),
            ChosenRejected(chosen=n_tokens[:B], rejected=n_tokens[B:]))


# ----------------------------------------------------------------------------
# The DPO loss family


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps, beta, loss_type="sigmoid", label_smoothing=0.0,
             chosen_n_tokens=None, rejected_n_tokens=None, **variant_options):
    """Per-pair losses and detached rewards. All log-probs are (B,) SUMS over response
    tokens; the token counts (B,) are needed by the per-token losses.

      sigmoid  -log sigma(beta h)                      Rafailov et al. 2023, Eq. 7
               with label_smoothing eps (conservative DPO, Mitchell 2023):
               -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
      ipo      (h_avg - 1/(2 beta))^2, h_avg: h from per-token AVERAGED log-probs
               (Azar et al. 2023, arXiv:2310.12036)

    Every other loss_type is one of the variants in extras/losses.py, called with the
    same arguments (variant_options: their own, e.g. dpop_lambda).

    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)), the rewards
    detached: beta * (log pi(y|x) - log pi_ref(y|x)), the implicit reward of Eq. 5.

    Worked example, one pair whose chosen answer gained 1 nat over the reference and the
    rejected lost 1 (h = 2), beta 0.5: -log sigma(1) = 0.31326:

        >>> import math
        >>> t = lambda v: torch.tensor([v])
        >>> losses, chosen, rejected = dpo_loss(t(-9.0), t(-21.0), t(-10.0), t(-20.0), 0.5)
        >>> round(losses.item(), 5), round(math.log(1 + math.exp(-1.0)), 5)
        (0.31326, 0.31326)
        >>> chosen.item(), rejected.item()
        (0.5, -0.5)
    """
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose from {LOSS_TYPES}")
    if LOSSES[loss_type] is not None:  # a variant (extras/losses.py)
        return LOSSES[loss_type](policy_chosen_logps, policy_rejected_logps,
                                 reference_chosen_logps, reference_rejected_logps, beta,
                                 label_smoothing, chosen_n_tokens, rejected_n_tokens,
                                 **variant_options)
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    h = pi_logratios - ref_logratios  # h_{pi_theta}^{y_w, y_l} in the paper, (B,)
    # each answer's gain over the reference, log pi(y|x) - log pi_ref(y|x): its reward / beta
    r_w = policy_chosen_logps - reference_chosen_logps  # (B,)
    r_l = policy_rejected_logps - reference_rejected_logps  # (B,)

    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)  # Eq. 7
        if label_smoothing > 0:  # conservative DPO: a share eps of the labels is flipped
            losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * h)
    else:  # ipo, on per-token averages: h_avg = h with each gain / its answer's length
        losses = (r_w / chosen_n_tokens - r_l / rejected_n_tokens - 1 / (2 * beta)) ** 2
    return losses, beta * r_w.detach(), beta * r_l.detach()


def dpo_objective(loss_fn, logps, n_tokens, ref, sft_alpha, aux_loss, **options):
    """What a DPO step minimises, and its metrics: loss_fn (dpo_loss with the run's
    hyper-parameters) per pair, their mean, plus sft_alpha times RPO's NLL of the chosen
    answers (each pair's token mean, then the batch mean; TRL pools the tokens) and the
    MoE's load-balancing aux_loss (0 if dense). logps and n_tokens are the policy's
    ChosenRejected, ref the reference's; options go to loss_fn (a variant's state).
    Returns (loss, metrics), the metrics 0-dim tensors (no host sync here)."""
    pair_losses, chosen_rewards, rejected_rewards = loss_fn(
        logps.chosen, logps.rejected, ref.chosen, ref.rejected,
        chosen_n_tokens=n_tokens.chosen, rejected_n_tokens=n_tokens.rejected, **options)
    nll = (-logps.chosen / n_tokens.chosen).mean()
    loss = pair_losses.mean() + sft_alpha * nll + aux_loss
    metrics = preference_metrics(pair_losses, chosen_rewards, rejected_rewards, logps)
    metrics.update({"loss": loss.detach(), "loss/nll": nll.detach(),
                    "loss/aux": aux_loss.detach()})
    return loss, metrics


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


def read_step(step_metrics, names, grad_norm, world_size):
    """The step's one read from the device (its one host sync): the metrics (0-dim tensors
    by name) averaged over all ranks in one all_reduce, and the gradient norm (0-dim, the
    same on every rank: DDP averaged the gradients). Returns (record, grad_norm): the
    metrics as floats by name, in the order of names, and the norm as a float."""
    values = torch.stack([step_metrics[n] for n in names])  # (M,) on device
    if world_size > 1:
        dist.all_reduce(values)  # summed over ranks: one collective
    values = torch.cat([values / world_size, grad_norm.float()[None]])  # (M + 1,)
    *values, grad_norm = values.tolist()  # the one sync (float16's scaler adds its own)
    return dict(zip(names, values)), grad_norm
