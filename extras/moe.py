"""The mixture-of-experts feed-forward, MiniMind's option (`--n-experts`, the
`minimind-768-moe` preset): model.Block takes it in place of the SwiGLU feed-forward, and
model.Transformer adds up its load-balancing losses after each forward (`aux_loss`).
"""

import torch
import torch.nn as nn

from model import FeedForward


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
        # The picks grouped by expert, in token order. Their sizes cost one look from the
        # host a layer (a torch.where for each expert would cost one look each).
        flat = chosen.flatten()  # (N * k,) the expert of each pick, token by token
        ones = torch.ones_like(weights).flatten()  # (N * k,)
        picks = probs.new_zeros(len(self.experts)).index_add(0, flat, ones)  # (E,) per expert
        sizes = picks.long().tolist()
        by_expert = flat.argsort(stable=True)  # (N * k,)
        token, weight = by_expert // self.k, weights.flatten()[by_expert]  # (N * k,) each
        y = torch.zeros_like(x)  # (N, C)
        for expert, t, w in zip(self.experts, token.split(sizes), weight.split(sizes)):
            # (an expert with no token still runs on 0 rows: every parameter is in the graph)
            y.index_add_(0, t, expert(x[t]) * w[:, None].to(x.dtype))
        load = picks / len(x)  # (E,) the share of tokens that picked each expert (sums to k)
        self.aux_loss = self.coef * len(self.experts) * (load * probs.mean(dim=0)).sum()
        return y.view(shape)
