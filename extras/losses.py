"""The DPO variants beyond the core's Eq. 7, conservative DPO and IPO (loss.dpo_loss):
each a small function with its formula and paper, registered by name in VARIANTS, which
loss.LOSSES takes in (`--loss NAME`). Every one is called as loss.dpo_loss calls it:

    fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
       reference_rejected_logps, beta, label_smoothing, chosen_n_tokens, rejected_n_tokens,
       dpop_lambda=..., simpo_gamma=..., rdpo_alpha=..., bco_delta=...)
       -> (losses (B,), chosen_rewards (B,), rejected_rewards (B,))

All log-probs are (B,) SUMS over response tokens. With r_w and r_l the gains
log pi(y|x) - log pi_ref(y|x) of the chosen and rejected answers over the reference, h =
r_w - r_l (loss.dpo_loss's pi_logratios - ref_logratios, the same number), avg(.) a
log-prob divided by its answer's token count and |y| that count. The rewards are the
implicit ones, beta r (detached), except for simpo and orpo, which have no reference and
log beta avg(log pi(y|x)), the quantity their losses compare (SimPO's Eq. 4; TRL logs the
same): their margins and accuracies are not comparable with the other losses'.

tests/test_parity.py holds every loss TRL also has to TRL's own outputs (tests/fixtures/
trl); R-DPO and DPOP, which it lacks, have worked examples from their papers below.
"""

import torch
import torch.nn.functional as F

VARIANTS = {}  # name -> loss function, in the order of --loss's choices
REFERENCE_FREE = ("simpo", "orpo")  # they never read the reference's log-probs
SMOOTHED = ("robust", "simpo")  # the variants --label-smoothing acts on
RUN_KEYS = ("dpop_lambda", "simpo_gamma", "rdpo_alpha")  # flags that change the numbers


def options(args):
    """The variants' own hyper-parameters from the parsed flags, as dpo_loss keywords."""
    return {name: getattr(args, name) for name in RUN_KEYS}


def add_args(parser):
    """The variants' own flags (train_dpo.py)."""
    parser.add_argument("--dpop-lambda", type=float, default=50.0,
                        help="dpop: weight of the penalty on a chosen answer less likely "
                        "than under the reference")
    parser.add_argument("--simpo-gamma", type=float, default=0.5,
                        help="simpo: target reward margin gamma")
    parser.add_argument("--rdpo-alpha", type=float, default=0.01,
                        help="rdpo: alpha of Eq. 9, +alpha (|y_w| - |y_l|) inside the "
                        "sigmoid: the reward a length-penalised judge gives, so length "
                        "alone earns nothing")


def variant(fn):
    VARIANTS[fn.__name__] = fn
    return fn


def gains(pw, pl, rw, rl):
    """(r_w, r_l, h) from the policy's and reference's summed log-probs; h as loss.dpo_loss
    computes it, (pi's chosen - rejected) - (pi_ref's), to the last bit."""
    r_w, r_l = pw - rw, pl - rl  # (B,) each
    return r_w, r_l, (pw - pl) - (rw - rl)


def implicit_rewards(beta, r_w, r_l):
    return beta * r_w.detach(), beta * r_l.detach()


@variant
def robust(pw, pl, rw, rl, beta, label_smoothing=0.0, chosen_n_tokens=None,
           rejected_n_tokens=None, **options):
    """[-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps): an unbiased
    loss under a share eps of flipped labels (Chowdhury et al. 2024, arXiv:2403.00409;
    eps = label_smoothing)."""
    r_w, r_l, h = gains(pw, pl, rw, rl)
    eps = label_smoothing
    losses = ((1 - eps) * -F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return losses, *implicit_rewards(beta, r_w, r_l)


@variant
def hinge(pw, pl, rw, rl, beta, label_smoothing=0.0, chosen_n_tokens=None,
          rejected_n_tokens=None, **options):
    """max(0, 1 - beta h) (SLiC-HF, Zhao et al. 2023, arXiv:2305.10425; RSO, Liu et al.
    2023, arXiv:2309.06657)."""
    r_w, r_l, h = gains(pw, pl, rw, rl)
    return torch.relu(1 - beta * h), *implicit_rewards(beta, r_w, r_l)


@variant
def norm(pw, pl, rw, rl, beta, label_smoothing=0.0, chosen_n_tokens=None,
         rejected_n_tokens=None, **options):
    """-log sigma(beta h_avg), h_avg from per-token averaged gains: length-normalised
    DPO (Tulu 3, Lambert et al. 2024, arXiv:2411.15124)."""
    r_w, r_l, _ = gains(pw, pl, rw, rl)
    losses = -F.logsigmoid(beta * (r_w / chosen_n_tokens - r_l / rejected_n_tokens))
    return losses, *implicit_rewards(beta, r_w, r_l)


@variant
def dpop(pw, pl, rw, rl, beta, label_smoothing=0.0, chosen_n_tokens=None,
         rejected_n_tokens=None, dpop_lambda=50.0, **options):
    """-log sigma(beta (h - lambda max(0, log pi_ref(y_w) - log pi(y_w)))): a penalty once
    the chosen answer falls below the reference (DPO-Positive, Smaug, Pal et al. 2024,
    arXiv:2402.13228; lambda = dpop_lambda).

    The paper's Eq. 3 with the chosen answer 0.1 below the reference (r_w = -0.1, r_l = -1,
    h = 0.9), beta 1 and lambda 5: -log sigma(0.9 - 5 * 0.1) = -log sigma(0.4) = 0.51302;
    above the reference the penalty is 0 and it is plain DPO, -log sigma(0.9) = 0.34115:

        >>> import math
        >>> t = lambda *v: torch.tensor(v, dtype=torch.float64)
        >>> losses, _, _ = dpop(t(-10.1, -9.9), t(-21.0, -20.8), t(-10.0, -10.0),
        ...                     t(-20.0, -20.0), beta=1.0, dpop_lambda=5.0)
        >>> [round(x, 5) for x in losses.tolist()]
        [0.51302, 0.34115]
        >>> round(math.log(1 + math.exp(-0.4)), 5), round(math.log(1 + math.exp(-0.9)), 5)
        (0.51302, 0.34115)
    """
    r_w, r_l, h = gains(pw, pl, rw, rl)
    losses = -F.logsigmoid(beta * (h - dpop_lambda * torch.relu(-r_w)))
    return losses, *implicit_rewards(beta, r_w, r_l)


@variant
def simpo(pw, pl, rw, rl, beta, label_smoothing=0.0, chosen_n_tokens=None,
          rejected_n_tokens=None, simpo_gamma=0.5, **options):
    """-log sigma(beta avg(log pi(y_w)) - beta avg(log pi(y_l)) - gamma): no reference, a
    target margin gamma (Meng et al. 2024, arXiv:2405.14734); label_smoothing eps as in
    conservative DPO (as TRL's CPO applies it)."""
    avg_w, avg_l = pw / chosen_n_tokens, pl / rejected_n_tokens
    margin = beta * (avg_w - avg_l) - simpo_gamma
    losses = (-(1 - label_smoothing) * F.logsigmoid(margin)
              - label_smoothing * F.logsigmoid(-margin))
    return losses, beta * avg_w.detach(), beta * avg_l.detach()


@variant
def rdpo(pw, pl, rw, rl, beta, label_smoothing=0.0, chosen_n_tokens=None,
         rejected_n_tokens=None, rdpo_alpha=0.01, **options):
    """-log sigma(beta h + alpha (|y_w| - |y_l|)) (R-DPO, Park et al. 2024, arXiv:2403.19159,
    Eq. 9): the reward a length-penalised judge would give is r - alpha |y|, so a chosen
    answer that is longer gets a smaller loss and gradient, one that wins by being shorter
    a larger one: no push to length.

    Eq. 9 with r_w = -1, r_l = -3 (h = 2), |y_w| = 30, |y_l| = 10, beta 0.5, alpha 0.05
    gives -log sigma(0.5 * 2 + 0.05 * 20) = -log sigma(2) = 0.12693:

        >>> import math
        >>> t = lambda *v: torch.tensor(v, dtype=torch.float64)
        >>> losses, _, _ = rdpo(t(-11.0), t(-23.0), t(-10.0), t(-20.0), beta=0.5,
        ...                     rdpo_alpha=0.05, chosen_n_tokens=t(30.0),
        ...                     rejected_n_tokens=t(10.0))
        >>> round(losses.item(), 5), round(math.log(1 + math.exp(-2.0)), 5)
        (0.12693, 0.12693)
    """
    r_w, r_l, h = gains(pw, pl, rw, rl)
    losses = -F.logsigmoid(beta * h + rdpo_alpha * (chosen_n_tokens - rejected_n_tokens))
    return losses, *implicit_rewards(beta, r_w, r_l)  # + above: Park et al.'s Eq. 9


@variant
def bco_pair(pw, pl, rw, rl, beta, label_smoothing=0.0, chosen_n_tokens=None,
             rejected_n_tokens=None, bco_delta=0.0, **options):
    """-log sigma(beta r_w - delta) - log sigma(-(beta r_l - delta)), delta a running mean
    of the rewards, kept by the trainer (extras/variant_state.py; Jung et al. 2024,
    arXiv:2404.04656)."""
    r_w, r_l, _ = gains(pw, pl, rw, rl)
    losses = -F.logsigmoid(beta * r_w - bco_delta) - F.logsigmoid(-(beta * r_l - bco_delta))
    return losses, *implicit_rewards(beta, r_w, r_l)


@variant
def nca_pair(pw, pl, rw, rl, beta, label_smoothing=0.0, chosen_n_tokens=None,
             rejected_n_tokens=None, **options):
    """-log sigma(beta r_w) - 1/2 log sigma(-beta r_w) - 1/2 log sigma(-beta r_l) (Chen et
    al. 2024, arXiv:2402.05369)."""
    r_w, r_l, _ = gains(pw, pl, rw, rl)
    losses = (-F.logsigmoid(beta * r_w) - 0.5 * F.logsigmoid(-beta * r_w)
              - 0.5 * F.logsigmoid(-beta * r_l))
    return losses, *implicit_rewards(beta, r_w, r_l)


@variant
def apo_zero(pw, pl, rw, rl, beta, label_smoothing=0.0, chosen_n_tokens=None,
             rejected_n_tokens=None, **options):
    """(1 - sigma(beta r_w)) + sigma(beta r_l): chosen up, rejected down, each on its own
    (D'Oosterlinck et al. 2024, arXiv:2408.06266)."""
    r_w, r_l, _ = gains(pw, pl, rw, rl)
    losses = (1 - torch.sigmoid(beta * r_w)) + torch.sigmoid(beta * r_l)
    return losses, *implicit_rewards(beta, r_w, r_l)


@variant
def sppo_hard(pw, pl, rw, rl, beta, label_smoothing=0.0, chosen_n_tokens=None,
              rejected_n_tokens=None, **options):
    """(r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2 (Wu et al. 2024, arXiv:2405.00675)."""
    r_w, r_l, _ = gains(pw, pl, rw, rl)
    losses = (r_w - 1 / (2 * beta)) ** 2 + (r_l + 1 / (2 * beta)) ** 2
    return losses, *implicit_rewards(beta, r_w, r_l)


@variant
def orpo(pw, pl, rw, rl, beta, label_smoothing=0.0, chosen_n_tokens=None,
         rejected_n_tokens=None, **options):
    """-avg(log pi(y_w)) - beta log sigma(log odds(y_w) - log odds(y_l)), odds(y) = p / (1 - p)
    with p = exp(avg(log pi(y))); no reference (Hong et al. 2024, arXiv:2403.07691; beta is
    the paper's lambda). The NLL term is each pair's token mean over its answer (TRL pools
    all chosen tokens of the batch, the prompt's included): the same for equal lengths."""
    avg_w, avg_l = pw / chosen_n_tokens, pl / rejected_n_tokens
    log_odds = (avg_w - log1mexp(avg_w)) - (avg_l - log1mexp(avg_l))
    losses = -avg_w - beta * F.logsigmoid(log_odds)
    return losses, beta * avg_w.detach(), beta * avg_l.detach()


def log1mexp(x):
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012): log(-expm1(x))
    near 0, log1p(-exp(x)) far below. x is clamped just under 0, where 1 - e^x is 0."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
