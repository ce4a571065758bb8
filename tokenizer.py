"""Byte-level BPE: train it in plain Python, save it in tiktoken's file format, load it
as a `tiktoken.Encoding`, which does all encoding at run time.

Training is shown twice, minbpe-style: `train_bpe_naive` is the algorithm in a
dozen lines (recount every pair, merge the most frequent, repeat); `train_bpe`
is the same algorithm made fast (the tests check that both learn the same
merges). Text is first cut by the GPT-4 pre-split pattern, and BPE never merges
across those chunks (Sennrich et al. 2016, arXiv:1508.07909; byte-level as in
GPT-2).

Train a tokenizer on your own data (every string of every record is used):
    python tokenizer.py --files my_sft.jsonl my_pairs.jsonl --vocab-size 6400 --out my.tiktoken

A MiniMind (Hugging Face byte-level BPE) tokenizer.json converts to the same format
(`convert_hf_tokenizer`, run by `python -m tools.convert --from-minimind ...`): its ranks
go in the .tiktoken file, and its special tokens, pre-split pattern and chat
template in a small `.tiktoken.json` sidecar beside it.
"""

import base64
import hashlib
import heapq
import json
import os
import time
from collections import Counter

import regex  # installed with tiktoken (its own dependency); gives tiktoken's exact split
import tiktoken

from errors import ArgumentParser, UserError, run_main

# The GPT-4 (cl100k) pre-split: text is cut into chunks (words with their leading
# space, runs of up to 3 digits, punctuation, whitespace) and BPE never merges
# across chunks.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}|"""
                 r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")
# GPT-2's pre-split, which Hugging Face's "ByteLevel" pre-tokenizer (and so MiniMind's
# tokenizer) uses: no cap on digit runs, a space joins the word after it.
GPT2_SPLIT_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                      r"""|\s+(?!\S)|\s+""")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Ours: the last three ids of the vocabulary. A converted tokenizer's sidecar lists its own.
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TOKENIZER = os.path.join(HERE, "data", "tokenizer.tiktoken")

# ----------------------------------------------------------------------------
# Training


def merge(ids, pair, new_id):
    """Replace every occurrence of `pair` in `ids`, left to right, by `new_id`.

        >>> merge([1, 2, 3, 1, 2], (1, 2), 256)
        [256, 3, 256]
        >>> merge([97, 97, 97], (97, 97), 256)
        [256, 97]
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


def merge_and_count(ids, pair, new_id, count, changed):
    """merge(ids, pair, new_id), also adding to `changed` how the counts of the
    neighbouring pairs move when the chunk occurs `count` times: at each merged
    occurrence (x, a, b, y) -> (x, new, y), pair (x, a) becomes (x, new) and (b, y)
    becomes (new, y). The merged pair itself is dropped by the caller.

        >>> changed = Counter()
        >>> merge_and_count([1, 2, 3, 2, 3], (2, 3), 9, 10, changed)
        [1, 9, 9]
        >>> sorted((p, d) for p, d in changed.items() if d)
        [((1, 2), -10), ((1, 9), 10), ((3, 2), -10), ((9, 9), 10)]
    """
    a, b = pair
    out, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            if out:  # left neighbour: (x, a) -> (x, new); x may itself be a new token
                changed[out[-1], a] -= count
                changed[out[-1], new_id] += count
            if i + 2 < n:  # right neighbour: (b, y) -> (new, y)
                changed[b, ids[i + 2]] -= count
                changed[new_id, ids[i + 2]] += count
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def n_merges_for(vocab_size):
    """Merges to learn: the vocabulary holds 256 bytes, the merges and the specials."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UserError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}")
    return vocab_size - 256 - len(SPECIAL_TOKENS)


def train_bpe_naive(texts, vocab_size):
    """The whole algorithm, slowly: returns (merges, ranks) exactly as train_bpe does.

    merges: {(id_a, id_b): new_id} in the order learnt; ranks: {token bytes: id}, the
    256 single bytes first, then one entry per merge.

    Worked example, texts = ["aaab aaab"], 2 merges (vocab_size = 256 + 2 + 3):
    the chunks are "aaab" and " aaab". Step 1: the most frequent pair is (97, 97)
    "aa" (4 times) -> 256, so "aaab" = [256, 97, 98]. Step 2: (256, 97) and (97, 98)
    tie at 2 each; the smallest pair wins: (97, 98) "ab" -> 257, "aaab" = [256, 257].

        >>> train_bpe_naive(["aaab aaab"], 256 + 2 + 3)[0]
        {(97, 97): 256, (97, 98): 257}
    """
    chunks = [list(c.encode("utf-8")) for t in texts for c in regex.findall(SPLIT_PATTERN, t)]
    ranks = {bytes([i]): i for i in range(256)}  # token bytes -> id
    vocab = [bytes([i]) for i in range(256)]  # id -> token bytes
    merges = {}
    while len(merges) < n_merges_for(vocab_size):
        counts = Counter(p for ids in chunks for p in zip(ids, ids[1:]))  # every pair
        # A pair whose bytes are already a token (reached by another route) would be a
        # duplicate: not a candidate.
        candidates = [p for p in counts if vocab[p[0]] + vocab[p[1]] not in ranks]
        if not candidates:
            raise UserError(f"the text only supports {256 + len(merges)} merged tokens; "
                             f"asked for vocab_size {vocab_size}")
        pair = min(candidates, key=lambda p: (-counts[p], p))  # most frequent, then smallest
        merges[pair] = len(vocab)
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
        ranks[vocab[-1]] = merges[pair]
        chunks = [merge(ids, pair, merges[pair]) for ids in chunks]  # apply it everywhere
    return merges, ranks


def train_bpe(texts, vocab_size):
    """train_bpe_naive's merges, fast: the same (merges, ranks), used in practice.

    Three changes make it fast, none changes the result:
    1. identical chunks are counted once, with their multiplicity (a word that occurs
       10,000 times is one entry with count 10,000);
    2. pair counts are kept up to date instead of recounted: a merge only revisits the
       chunks that contain its pair (`where`), and only the pairs next to each merged
       occurrence change (merge_and_count);
    3. the most frequent pair comes from a heap of (-count, pair), so ties still go
       to the smallest pair; an entry whose count is out of date is dropped when
       popped (every change pushes a fresh entry).
    """
    n_merges = n_merges_for(vocab_size)
    chunk_counts = Counter()
    for text in texts:
        chunk_counts.update(regex.findall(SPLIT_PATTERN, text))
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]  # unique chunks
    counts = list(chunk_counts.values())  # how often each occurs
    pair_counts, where = Counter(), {}  # pair -> count; pair -> chunks that hold it
    for w, ids in enumerate(words):
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] += counts[w]
            where.setdefault(pair, set()).add(w)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)
    ranks = {bytes([i]): i for i in range(256)}
    vocab = [bytes([i]) for i in range(256)]
    merges = {}
    while len(merges) < n_merges:
        if not heap:
            raise UserError(f"the text only supports {256 + len(merges)} merged tokens; "
                             f"asked for vocab_size {vocab_size}")
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count or vocab[pair[0]] + vocab[pair[1]] in ranks:
            continue  # out of date, or a duplicate token: never a candidate
        new_id = len(vocab)
        merges[pair] = new_id
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
        ranks[vocab[-1]] = new_id
        changed = Counter()  # pair -> change of its count
        for w in where.pop(pair):
            new = merge_and_count(words[w], pair, new_id, counts[w], changed)
            for p in zip(new, new[1:]):
                if new_id in p:
                    where.setdefault(p, set()).add(w)
            words[w] = new
        del pair_counts[pair]
        for p, delta in changed.items():
            if delta and p != pair:
                pair_counts[p] += delta
                if pair_counts[p] > 0:
                    heapq.heappush(heap, (-pair_counts[p], p))
    return merges, ranks


def bpe_encode(text, merges, pattern=SPLIT_PATTERN):
    """Slow reference encoder: apply `merges` in the order they were learnt.

    tiktoken encodes by the rank of the merged bytes instead; the tests check that
    both give the same ids. Specials are not recognised (plain text only).

        >>> bpe_encode("aaab", {(97, 97): 256, (97, 98): 257})
        [256, 257]
    """
    out = []
    for chunk in regex.findall(pattern, text):
        ids = list(chunk.encode("utf-8"))
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: merges.get(p, float("inf")))
            if pair not in merges:
                break
            ids = merge(ids, pair, merges[pair])
        out.extend(ids)
    return out

# ----------------------------------------------------------------------------
# The .tiktoken file


def save_tiktoken(ranks, path):
    """Write ranks in tiktoken's file format: `base64(token bytes) rank`, one per line,
    atomically (a temporary file, fsync'ed, then renamed)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="ascii", newline="\n") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename (as checkpoint.atomic_write does)
    os.replace(tmp, path)


class Tokenizer(tiktoken.Encoding):
    """A tiktoken.Encoding that also names its chat template (data.Chat renders it):
    "chatml" for ours, "minimind" for a converted MiniMind tokenizer."""

    def __init__(self, *, chat_template="chatml", **kwargs):
        super().__init__(**kwargs)
        self.chat_template = chat_template


def sidecar_path(path):
    """Where a .tiktoken file's sidecar lives: special-token ids, pattern, chat template."""
    return path + ".json"


KNOWN_PATTERNS = (SPLIT_PATTERN, GPT2_SPLIT_PATTERN)


def read_sidecar(path):
    """The sidecar of a .tiktoken file as a dict ({} without one). Its pre-split pattern
    must be one of KNOWN_PATTERNS: a regular expression from a file is not compiled (a
    crafted one can hang or crash the regex engine)."""
    if not os.path.exists(sidecar_path(path)):
        return {}
    with open(sidecar_path(path), encoding="utf-8") as f:
        try:
            side = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{sidecar_path(path)}: not valid JSON ({e})") from None
    if not isinstance(side, dict):
        raise UserError(f"{sidecar_path(path)}: must hold a JSON object")
    if side.get("pattern", SPLIT_PATTERN) not in KNOWN_PATTERNS:
        raise UserError(f"{sidecar_path(path)}: unknown pre-split 'pattern'; only GPT-4's "
                        "and GPT-2's (tokenizer.KNOWN_PATTERNS) are accepted")
    return side


def load_tokenizer(path=DEFAULT_TOKENIZER):
    """Load a `.tiktoken` file as a `tiktoken.Encoding` (a Tokenizer). Without a sidecar
    file the three specials follow the ranks (our own tokenizers); with one (a converted
    tokenizer) its special tokens may sit at any ids, e.g. MiniMind's at 0..35."""
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError:  # also binascii.Error, a ValueError
                    raise UserError(f"{path}:{n}: not a tiktoken file (each line: a base64 "
                                    "token, a space, its rank)") from None
    side = read_sidecar(path)
    specials = side.get("special_tokens") or {tok: len(ranks) + i
                                               for i, tok in enumerate(SPECIAL_TOKENS)}
    ids = sorted([*ranks.values(), *specials.values()])
    if ids != list(range(len(ids))):
        raise UserError(f"{path}: token ids (ranks and special tokens) must be 0..{len(ids) - 1}"
                         f", each used once")
    missing = [tok for tok in SPECIAL_TOKENS if tok not in specials]
    if missing:
        raise UserError(f"{sidecar_path(path)}: special tokens {missing} are missing")
    name = os.path.splitext(os.path.basename(path))[0]
    return Tokenizer(name=name, pat_str=side.get("pattern", SPLIT_PATTERN),
                     mergeable_ranks=ranks, special_tokens=specials,
                     chat_template=side.get("chat_template", "chatml"))


def tokenizer_identity(path=DEFAULT_TOKENIZER):
    """What a checkpoint records to refuse a different tokenizer: file hash (with its
    sidecar's, if any) and vocab size."""
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read())
    if os.path.exists(sidecar_path(path)):
        with open(sidecar_path(path), "rb") as f:
            digest.update(f.read())
    digest = digest.hexdigest()
    return {"sha256": digest, "vocab_size": load_tokenizer(path).n_vocab}


def encode_text(enc, text):
    """Encode data text with specials treated as plain bytes: a literal "<|im_end|>" typed
    by a user cannot end a turn."""
    return enc.encode_ordinary(text)

# ----------------------------------------------------------------------------
# Converting a Hugging Face byte-level BPE tokenizer.json (MiniMind's)


def gpt2_byte_chars():
    """GPT-2's byte-to-character map, in which byte-level BPE vocabularies (HF "ByteLevel",
    MiniMind's) are written: printable bytes stand for themselves, the other 68 bytes
    take the characters from U+0100 on, in byte order.

        >>> chars = gpt2_byte_chars()
        >>> chars[ord("A")], chars[ord(" ")], chars[ord("\\n")]
        ('A', 'Ġ', 'Ċ')
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def convert_hf_tokenizer(json_path, out_path, chat_template="minimind"):
    """Write a Hugging Face byte-level BPE `tokenizer.json` as `out_path` (.tiktoken ranks =
    the token ids) plus its sidecar (added tokens as specials at their own ids, GPT-2's
    pre-split, the chat template). Returns the loaded Tokenizer.

    tiktoken merges by the rank of the merged bytes, HF by the order of its merge list;
    the two agree when each merge's result has a larger id than every earlier merge's,
    which is checked here (MiniMind's merge i makes token 292 + i)."""
    with open(json_path, encoding="utf-8") as f:
        hf = json.load(f)
    model, pre = hf.get("model") or {}, hf.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get(
            "use_regex", True) or pre.get("add_prefix_space") or hf.get("normalizer"):
        raise UserError(f"{json_path}: not a byte-level BPE tokenizer like MiniMind's "
                         f"(model {model.get('type')}, pre-tokenizer {pre.get('type')}, "
                         f"normaliser {hf.get('normalizer')})")
    specials = {t["content"]: t["id"] for t in hf.get("added_tokens", [])}
    byte_of = {c: b for b, c in gpt2_byte_chars().items()}
    ranks = {}
    for token, i in model["vocab"].items():
        if i in specials.values():
            continue
        try:
            ranks[bytes(byte_of[c] for c in token)] = i
        except KeyError:
            raise UserError(f"{json_path}: vocabulary token {token!r} is not byte-level "
                             f"(GPT-2 characters)") from None
    last = -1
    for n, merge in enumerate(model["merges"]):
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        made = model["vocab"].get(a + b, -1)
        if made <= last:
            raise UserError(f"{json_path}: merge {n} ({a!r} + {b!r}) makes id {made}, not "
                             f"above the previous merge's {last}: tiktoken would encode "
                             f"differently")
        last = made
    save_tiktoken(ranks, out_path)
    side = {"special_tokens": specials, "pattern": GPT2_SPLIT_PATTERN,
            "chat_template": chat_template}
    with open(sidecar_path(out_path), "w", encoding="utf-8") as f:
        json.dump(side, f, ensure_ascii=False, indent=1)
    return load_tokenizer(out_path)

# ----------------------------------------------------------------------------
# Training on files


def texts_of(value):
    """Every string inside a JSON value (roles and contents alike), in order.

        >>> texts_of({"messages": [{"role": "user", "content": "Hi"}], "n": 3})
        ['user', 'Hi']
    """
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in texts_of(v)]
    if isinstance(value, list):
        return [t for v in value for t in texts_of(v)]
    return []


def file_texts(path):
    """Every string of every record of a .jsonl file (one JSON value a line) or a .json
    array. Records are not validated: any text is good for BPE."""
    with open(path, encoding="utf-8") as f:
        if path.lower().endswith(".json"):
            return texts_of(json.load(f))
        texts = []
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    texts += texts_of(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        return texts


def train_tokenizer_on_files(files, vocab_size, out_path):
    """Train BPE on every string of the given data files and save it as .tiktoken."""
    _, ranks = train_bpe([t for path in files for t in file_texts(path)], vocab_size)
    save_tiktoken(ranks, out_path)
    return out_path


def main():
    parser = ArgumentParser(description="Train a byte-level BPE tokenizer on your "
                                     "SFT or preference files and save it as .tiktoken.")
    parser.add_argument("--files", nargs="+", required=True,
                        help="JSONL/JSON files; every string in every record is used")
    parser.add_argument("--vocab-size", type=int, default=6400,
                        help="vocabulary size, the 3 special tokens included")
    parser.add_argument("--out", required=True, help="output .tiktoken path")
    args = parser.parse_args()
    t0 = time.time()
    train_tokenizer_on_files(args.files, args.vocab_size, args.out)
    print(f"wrote {args.out}: vocab {load_tokenizer(args.out).n_vocab}, trained in "
          f"{time.time() - t0:.1f}s")


if __name__ == "__main__":
    run_main(main)
