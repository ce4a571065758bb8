"""The data side of minidpo: tokenizer, chat template, file readers, datasets, batching.

1. A byte-level BPE trainer in plain Python whose result is saved in tiktoken's
   own file format and loaded as a `tiktoken.Encoding`.
2. The ChatML template, rendering messages to `(ids, loss_mask)`.
3. Readers for the SFT and preference formats (JSONL or a JSON array), with
   errors that name the file, the line and the problem.
4. `SFTDataset` and `PreferenceDataset` with explicit truncation, collate
   functions with dynamic padding, and a deterministic, rank-sharded,
   optionally length-grouped batch order.

Train a tokenizer on your own data:
    python data.py --files my_sft.jsonl --vocab-size 4096 --out my.tiktoken
"""

import argparse
import base64
import hashlib
import json
import os
import random
from collections import Counter

import regex  # installed with tiktoken (its own dependency); gives tiktoken's exact split
import tiktoken
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(HERE, "data")
DEFAULT_TOKENIZER = os.path.join(DATA_DIR, "tokenizer.tiktoken")

# The GPT-4 (cl100k) pre-split: text is cut into chunks (words with their leading
# space, runs of up to 3 digits, punctuation, whitespace) and BPE never merges
# across chunks.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}|"""
                 r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]  # ids: the last three of the vocabulary
IGNORE_INDEX = -100  # target id that cross-entropy skips
ROLES = ("system", "user", "assistant")

# ----------------------------------------------------------------------------
# 1. Byte-level BPE


def _merge(ids, pair, new_id):
    """Replace every occurrence of `pair` in `ids` by `new_id`.

        >>> _merge([1, 2, 3, 1, 2], (1, 2), 256)
        [256, 3, 256]
    """
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_bpe(texts, vocab_size):
    """Learn BPE merges over the bytes of `texts`; return (merges, ranks).

    merges: {(id_a, id_b): new_id} in the order learnt; ranks: {token bytes: id},
    the 256 single bytes first, then one entry per merge. vocab_size counts the
    special tokens, so vocab_size - 256 - 3 merges are learnt.

    Worked example, texts = ["aaab aaab"], 2 merges (vocab_size = 256 + 2 + 3):
        chunks (pre-split): "aaab" x1, " aaab" x1
        step 1: most frequent pair (97, 97) "aa" (4 times) -> 256
                "aaab" = [256, 97, 98]    " aaab" = [32, 256, 97, 98]
        step 2: ties at 2 ((256, 97), (97, 98)); the smallest pair wins:
                (97, 98) "ab" -> 257      "aaab" = [256, 257]
        merges = {(97, 97): 256, (97, 98): 257}

    Counting runs over unique chunks with their counts, and each merge only
    revisits the chunks that contain the pair, so it is fast in plain Python.
    """
    n_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
    if n_merges < 0:
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}")
    chunk_counts = Counter()
    for text in texts:
        chunk_counts.update(regex.findall(SPLIT_PATTERN, text))
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    counts = list(chunk_counts.values())
    pair_counts, where = Counter(), {}
    for w, (ids, c) in enumerate(zip(words, counts)):
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] += c
            where.setdefault(pair, set()).add(w)
    ranks = {bytes([i]): i for i in range(256)}
    vocab = [bytes([i]) for i in range(256)]
    merges = {}
    while len(merges) < n_merges:
        # Most frequent pair; ties go to the smallest pair so training is deterministic.
        # A pair whose bytes are already a token would make a duplicate: skip it.
        candidates = [(c, (-p[0], -p[1])) for p, c in pair_counts.items()
                      if c > 0 and vocab[p[0]] + vocab[p[1]] not in ranks]
        if not candidates:
            raise ValueError(f"the text only supports {256 + len(merges)} merged tokens; "
                             f"asked for vocab_size {vocab_size}")
        _, neg = max(candidates)
        pair = (-neg[0], -neg[1])
        new_id = len(vocab)
        merges[pair] = new_id
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
        ranks[vocab[-1]] = new_id
        for w in where.pop(pair):
            ids, c = words[w], counts[w]
            for p in zip(ids, ids[1:]):
                pair_counts[p] -= c
            words[w] = ids = _merge(ids, pair, new_id)
            for p in zip(ids, ids[1:]):
                pair_counts[p] += c
                where.setdefault(p, set()).add(w)
        del pair_counts[pair]
    return merges, ranks


def bpe_encode(text, merges):
    """Slow reference encoder: apply `merges` in the order they were learnt.

    tiktoken encodes by the rank of the merged bytes instead; the tests check that
    both give the same ids. Specials are not recognised (plain text only).
    """
    out = []
    for chunk in regex.findall(SPLIT_PATTERN, text):
        ids = list(chunk.encode("utf-8"))
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: merges.get(p, float("inf")))
            if pair not in merges:
                break
            ids = _merge(ids, pair, merges[pair])
        out.extend(ids)
    return out


def save_tiktoken(ranks, path):
    """Write ranks in tiktoken's file format: `base64(token bytes) rank`, one per line."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="ascii", newline="\n") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")
    os.replace(tmp, path)


def load_tokenizer(path=DEFAULT_TOKENIZER):
    """Load a `.tiktoken` file as a `tiktoken.Encoding`; the three specials follow the ranks."""
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be 0..{len(ranks) - 1} with no gaps")
    specials = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
    name = os.path.splitext(os.path.basename(path))[0]
    return tiktoken.Encoding(name=name, pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens=specials)


def tokenizer_identity(path=DEFAULT_TOKENIZER):
    """What a checkpoint records to refuse a different tokenizer: file hash and vocab size."""
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"sha256": digest, "vocab_size": load_tokenizer(path).n_vocab}


def encode_text(enc, text):
    """Encode data text with specials treated as plain bytes: a literal "<|im_end|>" typed
    by a user cannot end a turn."""
    return enc.encode_ordinary(text)


def train_tokenizer_on_files(files, vocab_size, out_path):
    """Train BPE on the message texts of SFT/preference files and save it as .tiktoken."""
    texts = []
    for path in files:
        for record, _ in read_records(path):
            texts.extend(_texts_of(record))
    _, ranks = train_bpe(texts, vocab_size)
    save_tiktoken(ranks, out_path)
    return out_path


def _texts_of(value):
    """Every string inside a record (roles and contents), for tokenizer training."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _texts_of(v)]
    if isinstance(value, list):
        return [t for v in value for t in _texts_of(v)]
    return []

# ----------------------------------------------------------------------------
# 2. The chat template (ChatML)


class Chat:
    """Renders messages with the ChatML template: `<|im_start|>{role}\\n{content}<|im_end|>\\n`.

    Each piece is encoded on its own and the ids concatenated, so the ids of a
    prompt never depend on the response that follows it.
    """

    def __init__(self, enc):
        self.enc = enc
        self.im_start = enc.encode_single_token(IM_START)
        self.im_end = enc.encode_single_token(IM_END)
        self.pad_id = enc.encode_single_token(ENDOFTEXT)
        self.newline = encode_text(enc, "\n")

    def header(self, role):
        return [self.im_start] + encode_text(self.enc, role + "\n")

    def render(self, messages):
        """(ids, loss_mask) of a whole conversation; the mask is 1 on each assistant
        message's content tokens and its <|im_end|>, 0 elsewhere.

        Worked example (ids shown as text):
            [system "Be kind.", user "Hi", assistant "Hello!"] ->
            <|im_start|>system\\nBe kind.<|im_end|>\\n     mask 0 ...
            <|im_start|>user\\nHi<|im_end|>\\n             mask 0 ...
            <|im_start|>assistant\\n                      mask 0 ...
            Hello!<|im_end|>                             mask 1 ...
            \\n                                           mask 0
        """
        ids, mask = [], []
        for m in messages:
            head = self.header(m["role"])
            body = encode_text(self.enc, m["content"]) + [self.im_end]
            on = 1 if m["role"] == "assistant" else 0
            ids += head + body + self.newline
            mask += [0] * len(head) + [on] * len(body) + [0] * len(self.newline)
        return ids, mask

    def render_prompt(self, messages):
        """Prompt ids: the conversation so far, then the generation prompt
        `<|im_start|>assistant\\n`."""
        return self.render(messages)[0] + self.header("assistant")

    def render_response(self, messages):
        """(ids, mask) of the response that follows `render_prompt`: the first (assistant)
        message's content and <|im_end|>, then any further messages rendered in full. The
        trailing newline is left off: generation stops at <|im_end|>."""
        first = encode_text(self.enc, messages[0]["content"]) + [self.im_end]
        ids, mask = self.render(messages[1:])
        ids, mask = first + self.newline + ids, [1] * len(first) + [0] * len(self.newline) + mask
        return ids[:len(ids) - len(self.newline)], mask[:len(ids) - len(self.newline)]

# ----------------------------------------------------------------------------
# 3. Reading files


class RecordError(ValueError):
    """A problem with one record; `reason` is the short form used to count skips."""

    def __init__(self, message, reason=None):
        super().__init__(message)
        self.reason = reason or message


def read_records(path):
    """Yield (record, where) from a .jsonl file (one JSON value per line) or a .json array.
    `where` is "path:line" or "path[index]"; every problem raises ValueError naming it."""
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise ValueError(f"{path}: the file is empty (no records)")
    if raw.startswith(b"\xef\xbb\xbf"):
        raise ValueError(f"{path}:1: the file starts with a UTF-8 byte-order mark (BOM); "
                         "save it as UTF-8 without BOM")
    if path.endswith(".json"):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise ValueError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte "
                             f"{e.start})") from None
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: a .json file must hold an array of records, "
                             f"got {type(records).__name__}")
        for i, record in enumerate(records):
            yield record, f"{path}[{i}]"
        return
    for n, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield RecordError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})",
                              "not valid UTF-8"), where
            continue
        try:
            yield json.loads(text), where
        except json.JSONDecodeError as e:
            yield RecordError(f"{where}: invalid JSON ({e.msg})", "invalid JSON"), where


def _fail(where, problem, reason=None):
    raise RecordError(f"{where}: {problem}", reason or problem)


def _type_name(value):
    return type(value).__name__


def _message(m, where, field, roles=ROLES):
    """Validate one {"role","content"} or {"from","value"} message; return {"role","content"}."""
    if not isinstance(m, dict):
        _fail(where, f"'{field}' must hold message objects, got {_type_name(m)}", "wrong type")
    if "from" in m or "value" in m:  # ShareGPT
        role_key, content_key = "from", "value"
    else:
        role_key, content_key = "role", "content"
    for key in (role_key, content_key):
        if key not in m:
            _fail(where, f"a message in '{field}' has no '{key}'", f"missing key '{key}'")
    role, content = m[role_key], m[content_key]
    if not isinstance(role, str):
        _fail(where, f"'{role_key}' must be a string, got {_type_name(role)}", "wrong type")
    role = {"human": "user", "gpt": "assistant"}.get(role, role) if role_key == "from" else role
    if role not in roles:
        _fail(where, f"unknown role {m[role_key]!r} in '{field}' (expected one of "
              f"{', '.join(roles)})", "unknown role")
    if not isinstance(content, str):
        _fail(where, f"'{content_key}' must be a string, got {_type_name(content)}",
              "wrong type")
    if not content.strip():
        _fail(where, f"empty '{content_key}' in a {role} message in '{field}'", "empty content")
    return {"role": role, "content": content}


def _messages(value, where, field):
    if not isinstance(value, list):
        _fail(where, f"'{field}' must be a list of messages, got {_type_name(value)}",
              "wrong type")
    if not value:
        _fail(where, f"'{field}' is an empty list", "empty content")
    return [_message(m, where, field) for m in value]


def _require(record, keys, where):
    if not isinstance(record, dict):
        _fail(where, f"a record must be a JSON object, got {_type_name(record)}", "wrong type")
    for key in keys:
        if key not in record:
            _fail(where, f"missing key '{key}'", f"missing key '{key}'")


def sft_messages(record, where):
    """One SFT record in any supported format -> a list of {"role","content"} messages.

    {"messages": [...]}, {"conversations": [...]} (role/content or ShareGPT from/value),
    or Alpaca {"instruction", "input", "output"}.
    """
    if isinstance(record, dict) and "messages" in record:
        messages = _messages(record["messages"], where, "messages")
    elif isinstance(record, dict) and "conversations" in record:
        messages = _messages(record["conversations"], where, "conversations")
    elif isinstance(record, dict) and "instruction" in record:
        _require(record, ["instruction", "output"], where)
        parts = []
        for key in ("instruction", "input", "output"):
            value = record.get(key, "")
            if not isinstance(value, str):
                _fail(where, f"'{key}' must be a string, got {_type_name(value)}", "wrong type")
            parts.append(value)
        if not parts[0].strip() or not parts[2].strip():
            _fail(where, "empty 'instruction' or 'output'", "empty content")
        user = parts[0] + ("\n\n" + parts[1] if parts[1].strip() else "")
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": parts[2]}]
    else:
        _require(record, [], where)
        _fail(where, "missing key 'messages' (or 'conversations', or Alpaca's "
              "'instruction'/'output')", "missing key 'messages'")
    if not any(m["role"] == "assistant" for m in messages):
        _fail(where, "the conversation has no assistant message to learn from",
              "no assistant message")
    return messages


def _response(value, where, field):
    """A response given as a string, one message object, or a list of messages."""
    if isinstance(value, str):
        if not value.strip():
            _fail(where, f"'{field}' is empty", "empty content")
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        return [_message(value, where, field)]
    if isinstance(value, list):
        return _messages(value, where, field)
    _fail(where, f"'{field}' must be a string or a list of messages, got {_type_name(value)}",
          "wrong type")


def preference_messages(record, where):
    """One preference record in any supported format -> (prompt, chosen, rejected) messages.

    {"prompt": str, "chosen": str, "rejected": str}; the same with lists of messages;
    {"chosen": [msgs], "rejected": [msgs]} whose shared leading messages are the prompt
    (MiniMind); ShareGPT {"conversations": [...], "chosen": {...}, "rejected": {...}}.
    """
    _require(record, ["chosen", "rejected"], where)
    if "prompt" in record or "conversations" in record:
        key = "prompt" if "prompt" in record else "conversations"
        value = record[key]
        if isinstance(value, str):
            if not value.strip():
                _fail(where, f"'{key}' is empty", "empty content")
            prompt = [{"role": "user", "content": value}]
        else:
            prompt = _messages(value, where, key)
        chosen = _response(record["chosen"], where, "chosen")
        rejected = _response(record["rejected"], where, "rejected")
    else:  # implicit prompt: the messages both conversations share
        chosen_all = _messages(record["chosen"], where, "chosen")
        rejected_all = _messages(record["rejected"], where, "rejected")
        n = 0
        while (n < min(len(chosen_all), len(rejected_all)) - 1
               and chosen_all[n] == rejected_all[n]):
            n += 1
        prompt, chosen, rejected = chosen_all[:n], chosen_all[n:], rejected_all[n:]
    if not prompt or prompt[-1]["role"] != "user":
        _fail(where, "the prompt must end with a user message", "prompt not ending in user")
    for field, response in (("chosen", chosen), ("rejected", rejected)):
        if response[0]["role"] != "assistant":
            _fail(where, f"'{field}' must start with an assistant message",
                  "response not from assistant")
    return prompt, chosen, rejected


def load_records(path, parse, skip_invalid=False, log=print):
    """Parse every record of `path` with `parse(record, where)`. A bad record raises
    ValueError("path:line: problem"), or with skip_invalid is skipped and counted by
    reason (the counts are printed with `log`)."""
    out, skipped = [], Counter()
    for record, where in read_records(path):
        try:
            if isinstance(record, RecordError):
                raise record
            out.append(parse(record, where))
        except RecordError as e:
            if not skip_invalid:
                raise ValueError(str(e)) from None
            skipped[e.reason] += 1
    if skipped and log:
        log(f"{path}: skipped {sum(skipped.values())} invalid records: "
            + ", ".join(f"{n} {reason}" for reason, n in skipped.most_common()))
    if not out:
        raise ValueError(f"{path}: no valid records")
    return out, skipped

# ----------------------------------------------------------------------------
# 4. Datasets, truncation, collate, batch order


def truncate_pair(prompt, response, max_len, max_prompt_len):
    """Cut a prompt from the left to max_prompt_len (oldest tokens go first) and the
    response from the right so that prompt + response <= max_len. Returns new lists.

        >>> truncate_pair([1, 2, 3, 4], [5, 6, 7], max_len=5, max_prompt_len=3)
        ([2, 3, 4], [5, 6])
    """
    prompt = prompt[max(len(prompt) - max_prompt_len, 0):]
    return prompt, response[:max(max_len - len(prompt), 0)]


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

    Truncation as in truncate_pair. Dropped and counted: pairs left with no response
    tokens, and pairs whose chosen and rejected are identical."""

    def __init__(self, path, enc, max_len=256, max_prompt_len=128, skip_invalid=False,
                 log=print):
        chat = Chat(enc)
        records, self.skipped = load_records(path, preference_messages, skip_invalid, log)
        self.items, self.dropped = [], Counter()
        for prompt_msgs, chosen_msgs, rejected_msgs in records:
            prompt = chat.render_prompt(prompt_msgs)
            chosen, chosen_mask = chat.render_response(chosen_msgs)
            rejected, rejected_mask = chat.render_response(rejected_msgs)
            if chosen == rejected:
                self.dropped["identical chosen and rejected"] += 1
                continue
            p, chosen = truncate_pair(prompt, chosen, max_len, max_prompt_len)
            _, rejected = truncate_pair(prompt, rejected, max_len, max_prompt_len)
            chosen_mask, rejected_mask = chosen_mask[:len(chosen)], rejected_mask[:len(rejected)]
            if sum(chosen_mask) == 0 or sum(rejected_mask) == 0:
                self.dropped["no response tokens left"] += 1
                continue
            self.items.append({"prompt": p, "chosen": chosen, "chosen_mask": chosen_mask,
                               "rejected": rejected, "rejected_mask": rejected_mask})
        if self.dropped and log:
            log(f"{path}: dropped " + ", ".join(f"{n} pairs ({why})"
                                                for why, n in self.dropped.items()))
        if not self.items:
            raise ValueError(f"{path}: no usable pairs after truncation")
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


def pad_sequences(seqs, masks, pad_id):
    """Right-pad to the longest sequence in the batch (never a fixed length).

        >>> pad_sequences([[5, 6, 7], [8]], [[0, 1, 1], [1]], pad_id=0)
        (tensor([[5, 6, 7], [8, 0, 0]]), tensor([[0, 1, 1], [1, 0, 0]]))
    Padding is never in the mask.
    """
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B, T)
    loss_mask = torch.zeros((len(seqs), T), dtype=torch.long)  # (B, T)
    for b, (s, m) in enumerate(zip(seqs, masks)):
        ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
        loss_mask[b, :len(m)] = torch.tensor(m, dtype=torch.long)
    return ids, loss_mask


def collate_sft(items, pad_id):
    """[(ids, mask)] -> (input_ids (B, T), loss_mask (B, T)), right-padded."""
    return pad_sequences([i for i, _ in items], [m for _, m in items], pad_id)


def collate_pairs(items, pad_id):
    """Pairs -> one batch for a single forward pass: rows 0..B-1 are prompt+chosen and rows
    B..2B-1 prompt+rejected, right-padded to the longest of all 2B.

    Returns (input_ids (2B, T), loss_mask (2B, T)); the mask is 1 on the response tokens
    only. loss.split_pairs gives chosen and rejected back by name.
    """
    seqs = ([x["prompt"] + x["chosen"] for x in items]
            + [x["prompt"] + x["rejected"] for x in items])
    masks = ([[0] * len(x["prompt"]) + x["chosen_mask"] for x in items]
             + [[0] * len(x["prompt"]) + x["rejected_mask"] for x in items])
    return pad_sequences(seqs, masks, pad_id)


def epoch_batches(lengths, batch_size, seed, epoch, rank=0, world_size=1, grad_accum=1,
                  group_by_length=False):
    """This rank's micro-batches (lists of dataset indices) for one epoch, in order.

    One optimizer step consumes a global batch of batch_size * world_size * grad_accum
    examples drawn from a permutation seeded by (seed, epoch). Micro-step k of rank r
    takes its own slice of it, so ranks are disjoint and 2 ranks x batch B, or 1 rank x
    2 micro-batches of B, see exactly what 1 rank x batch 2B sees. The last incomplete
    global batch is dropped. With group_by_length, examples are sorted by length
    inside windows of 64 global batches, then the batch order is shuffled: less
    padding, still deterministic.
    """
    g = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    g.shuffle(order)
    size = batch_size * world_size * grad_accum
    if group_by_length:
        window = 64 * size
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s:s + window], key=lambda i: lengths[i])]
    batches = [order[s:s + size] for s in range(0, len(order) - size + 1, size)]
    if group_by_length:
        g.shuffle(batches)
    mine = []
    for batch in batches:
        for k in range(grad_accum):
            start = (k * world_size + rank) * batch_size
            mine.append(batch[start:start + batch_size])
    return mine


class BatchOrder:
    """Which examples each optimizer step trains on, on this rank: order(step) is the list
    of its grad_accum micro-batches (lists of dataset indices).

    The order is a pure function of (seed, step): epoch, position = divmod(step,
    steps_per_epoch), and epoch_batches does the rest. That is why --resume is exact:
    the checkpoint stores the step, and step k of a resumed run trains on the very
    batches that step k of an uninterrupted run would have.
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


def main():
    parser = argparse.ArgumentParser(description="Train a byte-level BPE tokenizer on your "
                                     "SFT or preference files and save it as .tiktoken.")
    parser.add_argument("--files", nargs="+", required=True,
                        help="JSONL/JSON files; every string in every record is used")
    parser.add_argument("--vocab-size", type=int, default=6400,
                        help="vocabulary size, the 3 special tokens included")
    parser.add_argument("--out", required=True, help="output .tiktoken path")
    args = parser.parse_args()
    train_tokenizer_on_files(args.files, args.vocab_size, args.out)
    enc = load_tokenizer(args.out)
    print(f"wrote {args.out}: vocab {enc.n_vocab}")


if __name__ == "__main__":
    main()
