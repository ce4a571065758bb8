"""Sequence log-probabilities, the DPO loss family, and the preference metrics.

DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model
is Secretly a Reward Model", arXiv:2305.18290) trains the policy pi_theta
directly on preference pairs (x, y_w, y_l), with a frozen reference pi_ref:

    L_DPO = -E[ log sigma( beta * h ) ],
    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]

(Eq. 7 of the paper). beta * (log pi(y|x) - log pi_ref(y|x)) is the implicit
reward of y. Not run directly; train_dpo.py uses it.
"""

from collections import namedtuple

import torch
import torch.nn.functional as F

ChosenRejected = namedtuple("ChosenRejected", ["chosen", "rejected"])
LOSS_TYPES = ("sigmoid", "ipo", "hinge")
METRIC_NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "logps/chosen", "logps/rejected")


def sequence_logps(logits, labels, loss_mask):
    """Log-probability of each sequence's masked tokens: the SUM (not the mean) over
    response tokens of log p(token_t | tokens_<t), in fp32.

    logits (B, T, V) predict the next token, so position t-1 scores labels[t]:
    the logits are shifted left by one against labels and loss_mask. Returns
    (logps (B,), n_tokens (B,)), the token counts for per-token averages.

    Worked example, V = 2, one sequence labels = [0, 1, 1], loss_mask = [0, 1, 1]:
        logits[0] = [0, 0]        -> p(labels[1] = 1) = 1/2
        logits[1] = [0, ln 3]     -> p(labels[2] = 1) = 3/4
        logits[2]                 -> predicts past the end: unused
        logps = ln(1/2) + ln(3/4) = -0.98083,  n_tokens = 2
    """
    logits = logits[:, :-1, :].float()  # (B, T-1, V)
    labels = labels[:, 1:]  # (B, T-1)
    mask = loss_mask[:, 1:].float()  # (B, T-1)
    # log p(label) = logit[label] - logsumexp(logits): no second (B, T-1, V) tensor
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    token_logps = picked - torch.logsumexp(logits, dim=-1)  # (B, T-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)  # (B,), (B,)


def split_pairs(x, n_pairs):
    """Rows 0..n-1 are the chosen sequences and rows n..2n-1 the rejected ones (the order
    data.collate_pairs builds); return them by name."""
    return ChosenRejected(chosen=x[:n_pairs], rejected=x[n_pairs:])


def concatenated_logps(model, batch):
    """One forward pass over chosen and rejected together.

    Returns (logps, n_tokens), each a ChosenRejected of (B,) tensors: summed response
    log-probs and response token counts. Same values as sequence_logps on the full
    logits, computed with less work: the output head runs only where a response token
    is predicted (prompt and padding positions get no logits), a chunk of rows at a
    time, so no (N, V) tensor is ever held (model.ChunkedTokenLogps).
    """
    ids, mask = batch["input_ids"], batch["loss_mask"]  # (2B, T) each
    predicts = torch.zeros_like(mask, dtype=torch.bool)  # (2B, T)
    predicts[:, :-1] = mask[:, 1:].bool()  # position t predicts token t+1
    labels = ids[:, 1:][mask[:, 1:].bool()]  # (N,) response tokens, row-major order
    token_logps = model(ids, positions=predicts, targets=labels)  # (N,) fp32
    rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(mask)
    rows = rows[:, 1:][mask[:, 1:].bool()]  # (N,) the sequence of each token
    logps = torch.zeros(ids.shape[0], device=ids.device).index_add(0, rows, token_logps)
    n_tokens = mask[:, 1:].sum(-1).float()  # (2B,)
    return split_pairs(logps, batch["n_pairs"]), split_pairs(n_tokens, batch["n_pairs"])


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps, beta=0.1, loss_type="sigmoid", label_smoothing=0.0,
             reference_free=False, chosen_n_tokens=None, rejected_n_tokens=None,
             sft_alpha=0.0):
    """Per-pair losses and detached rewards for the DPO family. All inputs are (B,) summed
    log-probs; the token counts are needed for "ipo" and for sft_alpha.

    With h = pi_logratios - ref_logratios (the `logits` below):
      sigmoid  -log sigma(beta h)                      Rafailov et al. 2023, Eq. 7
               with label_smoothing eps (conservative DPO, Mitchell 2023):
               -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
      ipo      (h_avg - 1/(2 beta))^2, h_avg from per-token AVERAGED log-probs
               (Azar et al. 2023, arXiv:2310.12036)
      hinge    max(0, 1 - beta h)   (SLiC-HF, Zhao et al. 2023, arXiv:2305.10425;
               RSO, Liu et al. 2023, arXiv:2309.06657)
    reference_free sets ref_logratios to 0. sft_alpha adds alpha * (token-mean NLL of
    y_w) per pair (RPO, Pang et al. 2024, arXiv:2404.19733).

    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)), rewards being
    beta * (log pi(y|x) - log pi_ref(y|x)) with summed log-probs, detached.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose from {LOSS_TYPES}")
    if reference_free:
        reference_chosen_logps = torch.zeros_like(policy_chosen_logps)
        reference_rejected_logps = torch.zeros_like(policy_rejected_logps)
    if loss_type == "ipo":
        pi_logratios = (policy_chosen_logps / chosen_n_tokens
                        - policy_rejected_logps / rejected_n_tokens)
        ref_logratios = (reference_chosen_logps / chosen_n_tokens
                         - reference_rejected_logps / rejected_n_tokens)
    else:
        pi_logratios = policy_chosen_logps - policy_rejected_logps
        ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios  # h, (B,)
    if loss_type == "sigmoid":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * logits)
                  - label_smoothing * F.logsigmoid(-beta * logits))
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * logits)
    if sft_alpha:
        losses = losses + sft_alpha * (-policy_chosen_logps / chosen_n_tokens)
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def preference_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen_logps,
                       policy_rejected_logps):
    """Batch means with TRL's names, as 0-dim tensors (no host sync here)."""
    return {
        "loss": losses.detach().mean(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),  # strict
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }
