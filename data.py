"""The data side of minidpo: the chat template, the datasets, batching.

The ChatML template renders messages to `(ids, loss_mask)` (MiniMind's own, with its
think block: extras/minimind.py). `SFTDataset` and `PreferenceDataset` tokenise the
records formats.py reads, with explicit truncation; collate functions pad dynamically;
the batch order is deterministic, rank-sharded and optionally length-grouped.

Not run directly; the training scripts use it. (Tokenizer: tokenizer.py.)
"""

import os
import random
from collections import Counter

import torch
from torch.nn.utils.rnn import pad_sequence

from devices import to_device
from errors import UserError
from formats import fit_prompt, load_records, preference_messages, sft_messages
from tokenizer import ENDOFTEXT, IM_END, IM_START, encode_text

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(HERE, "data")

# ----------------------------------------------------------------------------
# The chat template (ChatML)

TEMPLATES = ("chatml", "minimind")  # minimind: MiniMind's own (extras/minimind.py)


class Chat:
    """Renders messages with the ChatML template: `<|im_start|>{role}\n{content}<|im_end|>\n`.

    Each piece is encoded on its own and the ids concatenated, so the ids of a
    prompt never depend on the response that follows it. Chat(enc) of a converted
    MiniMind tokenizer, which names its template, is MiniMind's (extras/minimind.py).
    """

    def __new__(cls, enc, template=None):
        if cls is Chat and (template or getattr(enc, "chat_template", "chatml")) == "minimind":
            from extras.minimind import MiniMindChat  # the one plug-in point for templates
            cls = MiniMindChat
        return super().__new__(cls)

    def __init__(self, enc, template=None):
        self.enc = enc
        self.template = template or getattr(enc, "chat_template", "chatml")
        if self.template not in TEMPLATES:
            raise UserError(f"unknown chat template {self.template!r}; choose from {TEMPLATES}")
        self.im_start = enc.encode_single_token(IM_START)
        self.im_end = enc.encode_single_token(IM_END)
        self.pad_id = enc.encode_single_token(ENDOFTEXT)
        self.newline = encode_text(enc, "\n")

    def header(self, role):
        return [self.im_start] + encode_text(self.enc, role + "\n")

    def assistant_prefix(self, content):
        """(ids, mask, content): what opens an assistant turn before its content (nothing
        in ChatML) and the content that follows it."""
        return [], [], content

    def generation_prompt(self):
        """What the assistant's answer follows: `<|im_start|>assistant\n`."""
        return self.header("assistant")

    def render(self, messages):
        """(ids, loss_mask) of a whole conversation; the mask is 1 on each assistant
        message's content tokens and its <|im_end|>, 0 elsewhere.

        Worked example, the runs of equal mask decoded back to text:

            >>> import itertools
            >>> from tokenizer import load_tokenizer
            >>> chat = Chat(load_tokenizer())
            >>> ids, mask = chat.render([{"role": "user", "content": "Hi"},
            ...                          {"role": "assistant", "content": "Hello!"}])
            >>> for on, run in itertools.groupby(zip(ids, mask), key=lambda x: x[1]):
            ...     print(f"mask {on}: " + repr(chat.enc.decode([t for t, _ in run])))
            mask 0: '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
            mask 1: 'Hello!<|im_end|>'
            mask 0: '\\n'
        """
        ids, mask = [], []
        for m in messages:
            head, content, prefix, prefix_mask = self.header(m["role"]), m["content"], [], []
            on = 1 if m["role"] == "assistant" else 0
            if on:
                prefix, prefix_mask, content = self.assistant_prefix(content)
            body = encode_text(self.enc, content) + [self.im_end]
            ids += head + prefix + body + self.newline
            mask += [0] * len(head) + prefix_mask + [on] * len(body) + [0] * len(self.newline)
        return ids, mask

    def render_prompt(self, messages):
        """Prompt ids: the conversation so far, then the generation prompt
        `<|im_start|>assistant\n`."""
        return self.render(messages)[0] + self.generation_prompt()

    def render_response(self, messages):
        """(ids, mask) of the response that follows `render_prompt`: the first (assistant)
        message's content and <|im_end|>, then any further messages rendered in full. The
        trailing newline is left off: generation stops at <|im_end|>."""
        first = encode_text(self.enc, messages[0]["content"]) + [self.im_end]
        ids, mask = self.render(messages[1:])
        ids, mask = first + self.newline + ids, [1] * len(first) + [0] * len(self.newline) + mask
        return ids[:len(ids) - len(self.newline)], mask[:len(ids) - len(self.newline)]


# ----------------------------------------------------------------------------
# Datasets, truncation, collate, batch order


class SFTDataset:
    """Tokenised SFT conversations: each item is (ids, mask), cut from the right to max_len.
    Conversations left with no assistant token are dropped and counted."""

    def __init__(self, path, enc, max_len=256, skip_invalid=False, log=print):
        chat = Chat(enc)
        conversations, self.skipped = load_records(path, sft_messages, skip_invalid, log)
        self.items, self.dropped, self.truncated = [], Counter(), 0
        for messages in conversations:
            ids, mask = chat.render(messages)
            self.truncated += len(ids) > max_len
            ids, mask = ids[:max_len], mask[:max_len]
            if sum(mask[1:]) == 0:  # position 0 is never a target
                self.dropped["no response tokens left"] += 1
                continue
            self.items.append((ids, mask))
        if self.dropped and log:
            log(f"{path}: dropped {self.dropped['no response tokens left']} conversations "
                f"(no assistant token left within --max-len {max_len})")
        if not self.items:
            raise UserError(f"{path}: no usable conversations after truncation")
        self.pad_id = chat.pad_id

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def lengths(self):
        return [len(ids) for ids, _ in self.items]


class PreferenceDataset:
    """Tokenised preference pairs. Each item is a dict with prompt ids and, for chosen and
    rejected, response ids and mask; both share the very same prompt ids.

    The prompt is cut by formats.fit_prompt to max_prompt_len, each response from the
    right so that prompt + response <= max_len. Dropped and counted, after truncation:
    pairs left with no response tokens, and pairs whose chosen and rejected are identical
    (no DPO gradient: h is 0 whatever the policy)."""

    def __init__(self, path, enc, max_len=256, max_prompt_len=128, skip_invalid=False,
                 log=print):
        chat = Chat(enc)
        shortest = len(chat.render_prompt([{"role": "user", "content": ""}]))  # the template
        if max_prompt_len < shortest:
            raise UserError(f"--max-prompt-len {max_prompt_len} is shorter than the chat "
                            f"template's emptiest prompt ({shortest} tokens)")
        records, self.skipped = load_records(path, preference_messages, skip_invalid, log)
        self.items, self.dropped = [], Counter()
        for n, (prompt_msgs, chosen_msgs, rejected_msgs) in enumerate(records, 1):
            prompt = fit_prompt(chat, prompt_msgs, max_prompt_len)
            room = max(max_len - len(prompt), 0)  # response tokens that fit after the prompt
            try:
                chosen, chosen_mask = (x[:room] for x in chat.render_response(chosen_msgs))
                rejected, rejected_mask = (x[:room]
                                           for x in chat.render_response(rejected_msgs))
            except UserError as e:
                raise UserError(f"{path}: valid pair {n}: {e}") from None
            if sum(chosen_mask) == 0 or sum(rejected_mask) == 0:
                self.dropped["no response tokens left"] += 1
                continue
            if chosen == rejected:
                self.dropped["identical chosen and rejected"] += 1
                continue
            self.items.append({"prompt": prompt, "chosen": chosen, "chosen_mask": chosen_mask,
                               "rejected": rejected, "rejected_mask": rejected_mask})
        if self.dropped and log:
            log(f"{path}: dropped " + ", ".join(f"{n} pairs ({why})"
                                                for why, n in self.dropped.items()))
        if not self.items:
            raise UserError(f"{path}: no usable pairs after truncation")
        self.pad_id = chat.pad_id

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def lengths(self):
        return [pair_length(x) for x in self.items]


def pair_length(item):
    """Tokens a pair costs in the concatenated forward: prompt + chosen + prompt + rejected."""
    return 2 * len(item["prompt"]) + len(item["chosen"]) + len(item["rejected"])


def collate_sft(items, pad_id):
    """[(ids, mask)] -> (input_ids (B, T), loss_mask (B, T)), right-padded to the longest
    sequence of the batch (never to a fixed length). Padding is never in the mask.

        >>> ids, loss_mask = collate_sft([([5, 6, 7], [0, 1, 1]), ([8], [1])], pad_id=0)
        >>> ids
        tensor([[5, 6, 7],
                [8, 0, 0]])
        >>> loss_mask
        tensor([[0, 1, 1],
                [1, 0, 0]])
    """
    ids = pad_sequence([torch.tensor(i) for i, _ in items], batch_first=True,
                       padding_value=pad_id)  # (B, T)
    loss_mask = pad_sequence([torch.tensor(m) for _, m in items], batch_first=True)  # (B, T)
    return ids, loss_mask


def collate_pairs(items, pad_id):
    """Pairs -> one batch for a single forward pass: rows 0..B-1 are prompt+chosen and rows
    B..2B-1 prompt+rejected, right-padded to the longest of all 2B.

    Returns (input_ids (2B, T), loss_mask (2B, T)); the mask is 1 on the response tokens
    only. loss.concatenated_logps gives chosen and rejected back by name.
    """
    seqs = ([x["prompt"] + x["chosen"] for x in items]
            + [x["prompt"] + x["rejected"] for x in items])
    masks = ([[0] * len(x["prompt"]) + x["chosen_mask"] for x in items]
             + [[0] * len(x["prompt"]) + x["rejected_mask"] for x in items])
    ids = pad_sequence([torch.tensor(s) for s in seqs], batch_first=True,
                       padding_value=pad_id)  # (2B, T)
    loss_mask = pad_sequence([torch.tensor(m) for m in masks], batch_first=True)  # (2B, T)
    return ids, loss_mask


def pair_batch(dataset, idx, device, packed=False):
    """The pairs idx of dataset as one batch: (ids, mask) of collate_pairs, each (2B, T),
    rows 0..B-1 chosen and B..2B-1 rejected, the ids on device and the mask left on the
    host (loss.response_logps finds the response positions there, without waiting for the
    GPU). packed=True (--packed) is the one switch for another batch layout: each prompt
    once, no padding (extras/packed.py)."""
    items = [dataset[i] for i in idx]
    if packed:
        from extras.packed import pack_pairs
        return pack_pairs(items).to(device)
    ids, mask = collate_pairs(items, dataset.pad_id)
    return to_device(ids, device), mask


def per_process_batch(batch_size, world_size=1, grad_accum=1):
    """Examples in one micro-batch of one process: the global batch (--batch-size, the
    examples of one optimizer step) split over world_size processes and grad_accum
    micro-steps. It must split evenly, so that every launcher trains the same run.

        >>> per_process_batch(8, world_size=2), per_process_batch(8, 2, grad_accum=2)
        (4, 2)
    """
    if batch_size % (world_size * grad_accum):
        raise UserError(f"--batch-size {batch_size} (the global batch) does not split over "
                        f"{world_size} processes x --grad-accum {grad_accum}: make it a "
                        f"multiple of {world_size * grad_accum}")
    return batch_size // (world_size * grad_accum)


def epoch_batches(lengths, batch_size, seed, epoch, rank=0, world_size=1, grad_accum=1,
                  group_by_length=False):
    """This rank's micro-batches (lists of dataset indices) for one epoch, in order.

    One optimizer step consumes a global batch of batch_size examples drawn from a
    permutation seeded by (seed, epoch), whatever the launcher. Micro-step k of rank r
    takes its own slice of batch_size / (world_size * grad_accum) examples, so ranks are
    disjoint, and 2 ranks, or 2 micro-steps of 1 rank, see together exactly what 1 rank
    sees in one. The last incomplete global batch is dropped. With group_by_length,
    examples are sorted by length inside windows of 64 global batches, then the batch
    order is shuffled: less padding, still deterministic.
    """
    g = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    g.shuffle(order)
    micro = per_process_batch(batch_size, world_size, grad_accum)
    if group_by_length:
        window = 64 * batch_size
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s:s + window], key=lambda i: lengths[i])]
    batches = [order[s:s + batch_size] for s in range(0, len(order) - batch_size + 1,
                                                      batch_size)]
    if group_by_length:
        g.shuffle(batches)
    mine = []
    for batch in batches:
        for k in range(grad_accum):
            start = (k * world_size + rank) * micro
            mine.append(batch[start:start + micro])
    return mine


class BatchOrder:
    """Which examples each optimizer step trains on, on this rank: order(step) is the list
    of its grad_accum micro-batches (lists of dataset indices).

    For given data lengths and flags (--batch-size, --seed, --grad-accum,
    --group-by-length), step k's global batch is a pure function of k: epoch, position =
    divmod(k, steps_per_epoch), and epoch_batches does the rest. The world size only
    decides which rank takes which part of it. That is why --resume is exact, under any
    launcher: the checkpoint stores the step, and step k of a resumed run trains on the
    very batch that step k of an uninterrupted run would have.
    """

    def __init__(self, lengths, batch_size, seed, rank=0, world_size=1, grad_accum=1,
                 group_by_length=False):
        self.args = (lengths, batch_size, seed)
        self.kwargs = dict(rank=rank, world_size=world_size, grad_accum=grad_accum,
                           group_by_length=group_by_length)
        self.grad_accum = grad_accum
        self.epoch, self.batches = 0, epoch_batches(*self.args, 0, **self.kwargs)
        self.steps_per_epoch = len(self.batches) // grad_accum

    def __call__(self, step):
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:  # one epoch's order is kept; the next is made on demand
            self.epoch, self.batches = epoch, epoch_batches(*self.args, epoch, **self.kwargs)
        return self.batches[k * self.grad_accum:(k + 1) * self.grad_accum]
