"""Generation with a KV cache (generate); chat with a checkpoint, or show two checkpoints'
answers side by side.

Run:  python sample.py --ckpt out/sft.pt --prompt "What is 7 + 5?"
      python sample.py --ckpt out/sft.pt                      (interactive chat)
      python sample.py --ckpt out/sft.pt --compare out/dpo.pt  (held-out prompts, both models)
"""

import os

import torch

import data
import formats
import devices
import tasks
import tokenizer
from errors import ArgumentParser, run_main
from checkpoint import check_tokenizer, load_checkpoint, model_from_checkpoint
from flags import is_tinychat


# ----------------------------------------------------------------------------
# Generation: a Transformer continued token by token, with a KV cache


class KVCache:
    """Keys and values of every layer for generation, preallocated to max_len positions."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        head_dim = config.dim // config.n_heads
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # positions filled so far (advanced by the model after each forward)

    def update(self, layer, k, v):
        """Store k, v (B, Hkv, T, D) at the next positions; return all keys/values so far."""
        T = k.shape[2]
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        end = self.pos + T
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, Hkv, S, D)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
             stop_id=None, generator=None):
    """Continue each row of idx (B, T) by up to max_new_tokens tokens of the Transformer
    model, with a KV cache (each earlier position's keys and values, computed once).

    temperature 0 is greedy decoding; top_k keeps the k most likely tokens; top_p
    keeps the smallest set whose probability reaches p. A row stops at stop_id
    (included). Returns a list of B lists of new token ids.
    """
    B, T = idx.shape
    max_len = min(T + max_new_tokens, model.config.max_seq_len)
    cache = KVCache(model.config, B, max_len, idx.device, model.tok_embeddings.weight.dtype)
    logits = model(idx, cache=cache)[:, -1, :]  # (B, V)
    new_ids = []  # one (B,) tensor per step, left on the device: no sync per token
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    for i in range(max_len - T):
        next_id = sample_next(logits.float(), temperature, top_k, top_p, generator)  # (B,)
        new_ids.append(next_id)
        if stop_id is not None:
            done |= next_id == stop_id
            if i % 16 == 15 and done.all():  # one look every 16 tokens: a host sync
                break
        if cache.pos >= max_len:
            break
        logits = model(next_id[:, None], cache=cache)[:, -1, :]  # (B, V)
    if not new_ids:
        return [[] for _ in range(B)]
    rows = torch.stack(new_ids, dim=1).tolist()  # (B, L): one copy to the host
    if stop_id is None:
        return rows
    return [row[:row.index(stop_id) + 1] if stop_id in row else row for row in rows]


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id per row of logits (B, V): argmax at temperature 0, else a sample."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # (B, V)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the first token past p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


# ----------------------------------------------------------------------------
# Chat and side-by-side answers


def fit_for_generation(chat, messages, max_seq_len, max_new_tokens):
    """Prompt ids that leave max_new_tokens of room in the model's context (the prompt
    keeps at least half of it; the reply then stops at the context's end). A longer
    conversation is cut by training's rule, formats.fit_prompt: whole oldest turns first,
    then the last message's text from the left, headers kept. Returns (ids, was_cut)."""
    ids = chat.render_prompt(messages)
    room = max(max_seq_len - max_new_tokens, max_seq_len // 2)
    if len(ids) <= room:
        return ids, False
    return formats.fit_prompt(chat, messages, room), True


def cut_note(max_seq_len, max_new_tokens, how_many="prompts"):
    """The note that says prompts were cut by fit_for_generation."""
    return (f"note: {how_many} longer than the model's context allows (max_seq_len "
            f"{max_seq_len}, {max_new_tokens} new tokens) are cut to fit, oldest turns first")


class SayOnce:
    """log(message) the first time it is called, then nothing: one note per run."""

    def __init__(self, log=print):
        self.log, self.said = log, False

    def __call__(self, message):
        if not self.said:
            self.log(message)
            self.said = True


def reply(model, enc, messages, max_new_tokens=96, temperature=0.0, top_k=None, top_p=None,
          num_samples=1, generator=None, device="cpu", note=print):
    """The assistant's next message(s) after `messages`: a list of num_samples strings.
    A prompt too long for the model's context is cut to fit, and `note` says so."""
    chat = data.Chat(enc)
    ids, cut = fit_for_generation(chat, messages, model.config.max_seq_len, max_new_tokens)
    if cut:
        note(cut_note(model.config.max_seq_len, max_new_tokens))
    prompt = torch.tensor([ids] * num_samples, device=device)  # (N, T)
    outs = generate(model, prompt, max_new_tokens, temperature, top_k, top_p,
                    stop_id=chat.im_end, generator=generator)
    return [enc.decode([t for t in out if t != chat.im_end]) for out in outs]


def eval_prompts(path=os.path.join(data.DATA_DIR, "eval_prompts.jsonl")):
    """Held-out TinyChat prompts: [{"messages": [...], "meta": {...}}]."""
    return tasks.read_jsonl(path)


def one_per_skill(rows, n):
    """n prompts cycling through the skills, for a quick look."""
    by_skill = {}
    for row in rows:
        by_skill.setdefault(row["meta"]["skill"], []).append(row)
    picked = []
    for i in range(n):
        skill_rows = list(by_skill.values())[i % len(by_skill)]
        picked.append(skill_rows[i // len(by_skill) % len(skill_rows)])
    return picked


def show_samples(model, enc, n, device, data_path, val_path, pairs=False):
    """Print greedy answers to n held-out prompts at the end of training: TinyChat's, with
    their judge scores, when the model trained on the shipped TinyChat data; else the
    first prompts of the user's own held-out file (val_path), or, with none, a hint."""
    model.eval()
    note = SayOnce()
    if is_tinychat(data_path):
        for row in one_per_skill(eval_prompts(), n):
            answer = reply(model, enc, row["messages"], device=device, note=note)[0]
            score = tasks.judge(row["meta"], answer)["score"]
            print(f"[{row['meta']['skill']}] {row['messages'][-1]['content']}\n"
                  f"  -> {answer!r}  (judge {score:.2f})")
        return
    prompts = held_out_prompts(val_path, n, pairs) if val_path else []
    for messages in prompts:
        answer = reply(model, enc, messages, device=device, note=note)[0]
        print(f"[held-out] {messages[-1]['content']!r}\n  -> {answer!r}")
    if not prompts:
        print("to see answers: python sample.py --ckpt CHECKPOINT --tokenizer TOKENIZER "
              "--prompt '...'")


def held_out_prompts(path, n, pairs):
    """The first n prompts of a held-out file: the prompts of preference pairs, or SFT
    conversations up to their last assistant message."""
    parse = data.preference_messages if pairs else data.sft_messages
    records, _ = data.load_records(path, parse, skip_invalid=True, log=None)
    prompts = []
    for record in records:
        if pairs:
            prompts.append(record[0])
        else:
            last = max(i for i, m in enumerate(record) if m["role"] == "assistant")
            if last > 0:
                prompts.append(record[:last])
    return prompts[:n]


def load_model(path, enc_path, device):
    ckpt = load_checkpoint(path)
    check_tokenizer(ckpt, tokenizer.tokenizer_identity(enc_path), path)
    return model_from_checkpoint(ckpt, path).to(device).eval()


def main(argv=None):
    parser = ArgumentParser(description="Generate from a minidpo checkpoint.")
    parser.add_argument("--ckpt", default="out/sft.pt", help="checkpoint to load")
    parser.add_argument("--compare", default=None, help="a second checkpoint, side by side")
    parser.add_argument("--prompt", default=None, help="one user message (else interactive, "
                        "or held-out prompts with --compare)")
    parser.add_argument("--system", default=None, help="optional system message")
    parser.add_argument("--n", type=int, default=12, help="held-out prompts with --compare")
    parser.add_argument("--tokenizer", default=tokenizer.DEFAULT_TOKENIZER, help=".tiktoken file")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="longest answer")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the top k")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--device", default="auto", help="auto (the GPU if there is one), "
                        "cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    args.device = devices.choose_device(args.device, False, 0, 1, torch.cuda.device_count())

    enc = tokenizer.load_tokenizer(args.tokenizer)
    models = {args.ckpt: load_model(args.ckpt, args.tokenizer, args.device)}
    if args.compare:
        models[args.compare] = load_model(args.compare, args.tokenizer, args.device)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, device=args.device, note=SayOnce())

    def answer_all(messages, meta=None):
        for name, model in models.items():
            gen = torch.Generator(args.device).manual_seed(args.seed)
            text = reply(model, enc, messages, generator=gen, **options)[0]
            score = f"  (judge {tasks.judge(meta, text)['score']:.2f})" if meta else ""
            print(f"  {name}: {text}{score}")

    prefix = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        answer_all(prefix + [{"role": "user", "content": args.prompt}])
    elif args.compare:
        for row in one_per_skill(eval_prompts(), args.n):
            print(f"[{row['meta']['skill']}] {row['messages'][-1]['content']}")
            answer_all(row["messages"], row["meta"])
    else:
        model, history = models[args.ckpt], list(prefix)
        print("Chat with the model (empty line or Ctrl-D to quit).")
        while True:
            try:
                text = input("you> ").strip()
            except EOFError:
                break
            if not text:
                break
            history.append({"role": "user", "content": text})
            gen = torch.Generator(args.device).manual_seed(args.seed)
            answer = reply(model, enc, history, generator=gen, **options)[0]
            history.append({"role": "assistant", "content": answer})
            print(f"bot> {answer}")


if __name__ == "__main__":
    run_main(main)
