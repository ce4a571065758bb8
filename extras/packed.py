"""--packed: a batch layout with each pair's prompt once for its chosen and rejected
answers and no padding, so the matmuls, norms and feed-forwards run on fewer tokens; the
same numbers as the padded rows of data.collate_pairs (tests/test_flags.py trains the
same weights both ways). model.Transformer hands a PackedPairs batch its own forward;
train_dpo.py makes one per step with --packed.
"""

from dataclasses import astuple, dataclass

import torch

from devices import to_device
from loss import head_logps, split_chosen_rejected


@dataclass
class PackedPairs:
    """A batch of pairs with each distinct token once (opt-in --packed): the prompt of a
    pair is shared by its chosen and rejected rows, and there is no padding, so the
    matmuls, norms and feed-forwards run on fewer tokens. Same numbers as collate_pairs.

    ids (N,): per pair its prompt, chosen response, rejected response.
    index (2B, T): the rows of collate_pairs (0..B-1 prompt+chosen, B..2B-1
    prompt+rejected) as indices into ids, right-padded with index 0 (a padded position
    comes after every real one of its row, so causal attention never reads it).
    back (N,): where in the flattened (2B * T) rows each distinct token is read back from
    (a prompt token from its chosen row). pred, labels, seq (M,): for each response
    token counted in the loss, the index of the token that predicts it, its id and its
    row (0..2B-1). The prompt's last token predicts both responses' first tokens.
    """
    ids: torch.Tensor
    index: torch.Tensor
    back: torch.Tensor
    pred: torch.Tensor
    labels: torch.Tensor
    seq: torch.Tensor

    def to(self, device):
        return PackedPairs(*(to_device(t, device) for t in astuple(self)))

    def forward(self, model, head_at, head):
        """model.Transformer's forward over this layout: everything but attention runs on
        the N distinct tokens, attention on the (2B, T) rows `index` gathers; head_at is
        an index (M,) into the N tokens (`pred`)."""
        T = self.index.shape[1]
        if T > model.config.max_seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than max_seq_len "
                             f"{model.config.max_seq_len}")
        cos, sin = model.rope_cos[:T], model.rope_sin[:T]  # (T, D)
        x = model.dropout(model.tok_embeddings(self.ids))  # (N, C)
        for block in model.layers:
            attn = block.attn
            qkv = attn.wqkv(block.attn_norm(x))  # (N, .)
            # -> (2B, T, .) rows (index_select: qkv[self.index]'s values, a faster backward)
            qkv = qkv.index_select(0, self.index.view(-1)).view(*self.index.shape, -1)
            y = attn.attend(qkv, cos, sin)  # (2B, T, C)
            y = y.reshape(-1, y.shape[-1]).index_select(0, self.back)  # (N, C): one row each
            x = x + block.resid_dropout(attn.wo(y))
            x = x + block.ffn(block.ffn_norm(x))
        return model.finish(x, head_at, head)  # (M, V), or head's output


def pack_pairs(items):
    """Pairs -> PackedPairs (see there).

        >>> p = pack_pairs([{"prompt": [5, 6], "chosen": [7], "chosen_mask": [1],
        ...                  "rejected": [8, 9], "rejected_mask": [1, 1]}])
        >>> p.ids.tolist(), p.index.tolist(), p.back.tolist()
        ([5, 6, 7, 8, 9], [[0, 1, 2, 0], [0, 1, 3, 4]], [0, 1, 2, 6, 7])
        >>> p.pred.tolist(), p.labels.tolist(), p.seq.tolist()
        ([1, 1, 3], [7, 8, 9], [0, 1, 1])
    """
    B = len(items)
    T = max(len(x["prompt"]) + max(len(x["chosen"]), len(x["rejected"])) for x in items)
    ids, index, back, pred, labels, seq = [], [[0] * T for _ in range(2 * B)], [], [], [], []
    for b, x in enumerate(items):
        P = len(x["prompt"])
        prompt = list(range(len(ids), len(ids) + P))
        ids += x["prompt"]
        back += [b * T + t for t in range(P)]
        for row, side in ((b, "chosen"), (B + b, "rejected")):
            response = list(range(len(ids), len(ids) + len(x[side])))
            ids += x[side]
            back += [row * T + P + j for j in range(len(x[side]))]
            index[row][:P + len(response)] = prompt + response
            for j, (token, counted) in enumerate(zip(x[side], x[side + "_mask"])):
                if counted and P + j > 0:  # position 0 has no token before it
                    pred.append(index[row][P + j - 1])
                    labels.append(token)
                    seq.append(row)
    return PackedPairs(*(torch.tensor(v) for v in (ids, index, back, pred, labels, seq)))


def packed_logps(model, packed, chunked_head=False):
    """loss.concatenated_logps of a PackedPairs batch: the same numbers (summed in another
    order), from a forward over each distinct token once."""
    picked = head_logps(model, packed, packed.pred, packed.labels, chunked_head)  # (M,)
    n_rows = packed.index.shape[0]  # 2B
    logps = picked.new_zeros(n_rows).index_add(0, packed.seq, picked)  # (2B,) SUM per row
    # counted the same way, not with bincount, which on CUDA waits for the GPU (its max)
    n_tokens = picked.new_zeros(n_rows).index_add(0, packed.seq, torch.ones_like(picked))
    return split_chosen_rejected(logps, n_tokens)
