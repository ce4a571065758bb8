"""Reading the SFT and preference files: JSON Lines or a JSON array, every supported format,
and a one-line error naming the file, the line and what is wrong (or, with
--skip-invalid, the record skipped and counted). data.py's datasets read through
load_records; a learner can take it as given.

SFT: {"messages": [...]}, {"conversations": [...]} with role/content (MiniMind) or
from/value (ShareGPT), Alpaca's {"instruction", "input", "output"}. Preference:
{"prompt", "chosen", "rejected"} as strings or lists of messages; {"chosen": [msgs],
"rejected": [msgs]} with the shared leading messages as the prompt (MiniMind);
ShareGPT's {"conversations", "chosen": {...}, "rejected": {...}}.

Also the rule that cuts a prompt to --max-prompt-len (fit_prompt), which
data.PreferenceDataset and sample.py apply.
"""

import json
from collections import Counter

from errors import UserError
from tokenizer import encode_text

ROLES = ("system", "user", "assistant")

class RecordError(UserError):
    """A problem with one record; `reason` is the short form used to count skips."""

    def __init__(self, message, reason=None):
        super().__init__(message)
        self.reason = reason or message


def read_records(path):
    """Yield (record, where) from a .jsonl file (one JSON value per line) or a .json array.
    `where` is "path:line" or "path[index]"; every problem raises UserError naming it."""
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise UserError(f"{path}: the file is empty (no records)")
    if raw.startswith(b"\xef\xbb\xbf"):
        raise UserError(f"{path}:1: the file starts with a UTF-8 byte-order mark (BOM); "
                         "save it as UTF-8 without BOM")
    if path.lower().endswith(".json"):  # .json or .JSON: one array; else JSON Lines
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise UserError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte "
                             f"{e.start})") from None
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        except RecursionError:  # [[[[... thousands deep: Python's parser gives up
            raise UserError(f"{path}: JSON nested too deeply") from None
        if not isinstance(records, list):
            raise UserError(f"{path}: a .json file must hold an array of records, "
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
            record = json.loads(text)
        except json.JSONDecodeError as e:
            record = RecordError(f"{where}: invalid JSON ({e.msg})", "invalid JSON")
        except RecursionError:
            record = RecordError(f"{where}: JSON nested too deeply", "JSON nested too deeply")
        yield record, where


def check(where, rules, facts):
    """Apply (holds, problem, reason) rules in order; the first whose holds(facts) is false
    raises RecordError("where: problem"). problem and reason are templates filled from
    facts; reason is the short form that --skip-invalid counts."""
    for holds, problem, reason in rules:
        if not holds(facts):
            raise RecordError(f"{where}: {problem.format(**facts)}", reason.format(**facts))


def type_name(value):
    return type(value).__name__


SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}  # ShareGPT's "from" -> our role

# A message is {"role", "content"} or ShareGPT's {"from", "value"}. Its facts:
# m, field (where it sits), role_key, content_key, role, content.
MESSAGE_RULES = [
    (lambda f: isinstance(f["m"], dict),
     "'{field}' must hold message objects, got {type}", "wrong type"),
    (lambda f: f["role_key"] in f["m"],
     "a message in '{field}' has no '{role_key}'", "missing key '{role_key}'"),
    (lambda f: f["content_key"] in f["m"],
     "a message in '{field}' has no '{content_key}'", "missing key '{content_key}'"),
    (lambda f: isinstance(f["role"], str),
     "'{role_key}' must be a string, got {role_type}", "wrong type"),
    (lambda f: f["role"] in ROLES,
     "unknown role {raw_role!r} in '{field}' (expected one of system, user, assistant)",
     "unknown role"),
    (lambda f: isinstance(f["content"], str),
     "'{content_key}' must be a string, got {content_type}", "wrong type"),
    (lambda f: f["content"].strip(),
     "empty '{content_key}' in a {role} message in '{field}'", "empty content"),
]

# A list of messages (facts: value, field).
MESSAGES_RULES = [
    (lambda f: isinstance(f["value"], list),
     "'{field}' must be a list of messages, got {type}", "wrong type"),
    (lambda f: f["value"], "'{field}' is an empty list", "empty content"),
]

# A record (facts: record, type, missing: the first required key it lacks).
RECORD_RULES = [
    (lambda f: isinstance(f["record"], dict),
     "a record must be a JSON object, got {type}", "wrong type"),
    (lambda f: not f["missing"], "missing key '{missing}'", "missing key '{missing}'"),
]

# A piece of text (facts: value, field).
STRING_RULES = [
    (lambda f: isinstance(f["value"], str), "'{field}' must be a string, got {type}",
     "wrong type"),
    (lambda f: f["value"].strip(), "'{field}' is empty", "empty content"),
]

# A response: a string, one message object or a list of messages (facts: value, field).
RESPONSE_RULES = [
    (lambda f: isinstance(f["value"], (str, dict, list)),
     "'{field}' must be a string or a list of messages, got {type}", "wrong type"),
    (lambda f: not isinstance(f["value"], str) or f["value"].strip(),
     "'{field}' is empty", "empty content"),
]

# An SFT record must be in one of the known formats (facts: record, type).
SFT_FORMAT_RULES = [
    (lambda f: isinstance(f["record"], dict), "a record must be a JSON object, got {type}",
     "wrong type"),
    (lambda f: {"messages", "conversations", "instruction"} & set(f["record"]),
     "missing key 'messages' (or 'conversations', or Alpaca's 'instruction'/'output')",
     "missing key 'messages'"),
]
# What a whole conversation must be (facts: roles, of its messages in order).
SFT_RULES = [
    (lambda f: "assistant" in f["roles"],
     "the conversation has no assistant message to learn from", "no assistant message"),
]
PAIR_RULES = [  # facts: prompt, chosen, rejected roles
    (lambda f: f["prompt"][-1:] == ["user"],
     "the prompt must end with a user message", "prompt not ending in user"),
    (lambda f: f["chosen"][0] == "assistant",
     "'chosen' must start with an assistant message", "response not from assistant"),
    (lambda f: f["rejected"][0] == "assistant",
     "'rejected' must start with an assistant message", "response not from assistant"),
]


def read_message(m, where, field):
    """One message, checked by MESSAGE_RULES -> {"role", "content"}."""
    sharegpt = isinstance(m, dict) and ("from" in m or "value" in m)
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    raw_role = m.get(role_key) if isinstance(m, dict) else None
    role = raw_role
    if sharegpt and isinstance(raw_role, str):
        role = SHAREGPT_ROLES.get(raw_role, raw_role)  # human -> user, gpt -> assistant
    content = m.get(content_key) if isinstance(m, dict) else None
    check(where, MESSAGE_RULES, dict(
        m=m, field=field, type=type_name(m), role_key=role_key, content_key=content_key,
        raw_role=raw_role, role=role, role_type=type_name(raw_role), content=content,
        content_type=type_name(content)))
    return {"role": role, "content": content}


def read_messages(value, where, field):
    """A non-empty list of messages -> [{"role", "content"}]."""
    check(where, MESSAGES_RULES, dict(value=value, field=field, type=type_name(value)))
    return [read_message(m, where, field) for m in value]


def read_string(value, where, field):
    """A non-empty string."""
    check(where, STRING_RULES, dict(value=value, field=field, type=type_name(value)))
    return value


def read_response(value, where, field):
    """A string (one assistant message), one message object, or a list of messages."""
    check(where, RESPONSE_RULES, dict(value=value, field=field, type=type_name(value)))
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        return [read_message(value, where, field)]
    return read_messages(value, where, field)


def read_record(record, where, keys):
    """Check that a record is an object holding `keys`."""
    missing = [k for k in keys if not isinstance(record, dict) or k not in record]
    check(where, RECORD_RULES, dict(record=record, type=type_name(record),
                                   missing=missing[0] if missing else ""))


def sft_messages(record, where):
    """One SFT record in any supported format -> a list of {"role","content"} messages.

    {"messages": [...]}, {"conversations": [...]} (role/content or ShareGPT from/value),
    or Alpaca {"instruction", "input", "output"}: the instruction (and the input after
    a blank line) is the user message, the output the assistant's.

        >>> user, assistant = sft_messages({"instruction": "Translate", "input": "chat",
        ...                                 "output": "cat"}, "x")
        >>> user
        {'role': 'user', 'content': 'Translate\\n\\nchat'}
        >>> assistant
        {'role': 'assistant', 'content': 'cat'}
    """
    check(where, SFT_FORMAT_RULES, dict(record=record, type=type_name(record)))
    if "messages" in record or "conversations" in record:
        key = "messages" if "messages" in record else "conversations"
        messages = read_messages(record[key], where, key)
    else:  # Alpaca
        read_record(record, where, ["instruction", "output"])
        instruction = read_string(record["instruction"], where, "instruction")
        output = read_string(record["output"], where, "output")
        extra = record.get("input", "")  # optional, may be empty: the type rule only
        check(where, STRING_RULES[:1], dict(value=extra, field="input", type=type_name(extra)))
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    check(where, SFT_RULES, dict(roles=[m["role"] for m in messages]))
    return messages


def preference_messages(record, where):
    """One preference record in any supported format -> (prompt, chosen, rejected) messages.

    {"prompt": str, "chosen": str, "rejected": str}; the same with lists of messages;
    {"chosen": [msgs], "rejected": [msgs]} whose shared leading messages are the prompt
    (MiniMind); ShareGPT {"conversations": [...], "chosen": {...}, "rejected": {...}}.
    """
    read_record(record, where, ["chosen", "rejected"])
    key = next((k for k in ("prompt", "conversations") if k in record), None)
    if key is not None:
        if isinstance(record[key], str):
            prompt = [{"role": "user", "content": read_string(record[key], where, key)}]
        else:
            prompt = read_messages(record[key], where, key)
        chosen = read_response(record["chosen"], where, "chosen")
        rejected = read_response(record["rejected"], where, "rejected")
    else:  # implicit prompt: the messages both conversations share
        chosen_all = read_messages(record["chosen"], where, "chosen")
        rejected_all = read_messages(record["rejected"], where, "rejected")
        n = 0
        while (n < min(len(chosen_all), len(rejected_all)) - 1
               and chosen_all[n] == rejected_all[n]):
            n += 1
        prompt, chosen, rejected = chosen_all[:n], chosen_all[n:], rejected_all[n:]
    check(where, PAIR_RULES, {name: [m["role"] for m in msgs] for name, msgs in
                              (("prompt", prompt), ("chosen", chosen), ("rejected", rejected))})
    return prompt, chosen, rejected


def load_records(path, parse, skip_invalid=False, log=print):
    """Parse every record of `path` with `parse(record, where)`. A bad record raises
    UserError("path:line: problem"), or with skip_invalid is skipped and counted by
    reason (the counts are printed with `log`)."""
    out, skipped = [], Counter()
    for record, where in read_records(path):
        try:
            if isinstance(record, RecordError):
                raise record
            out.append(parse(record, where))
        except RecordError as e:
            if not skip_invalid:
                raise UserError(str(e)) from None
            skipped[e.reason] += 1
    if skipped and log:
        log(f"{path}: skipped {sum(skipped.values())} invalid records: "
            + ", ".join(f"{n} {reason}" for reason, n in skipped.most_common()))
    if not out:
        raise UserError(f"{path}: no valid records")
    return out, skipped


# ----------------------------------------------------------------------------
# A prompt cut to fit


def fit_prompt(chat, messages, max_prompt_len):
    """Prompt ids (render_prompt) of at most max_prompt_len tokens that still follow the
    chat template. Whole messages go first, oldest first, the system message kept while
    it fits beside the last message; when the last message alone is too long, its
    content is cut from the left, keeping its header and <|im_end|>.

        >>> from data import Chat
        >>> from tokenizer import load_tokenizer
        >>> chat = Chat(load_tokenizer())
        >>> messages = [{"role": "system", "content": "Be brief."},
        ...             {"role": "user", "content": "Hi there"},
        ...             {"role": "assistant", "content": "Hello! How can I help?"},
        ...             {"role": "user", "content": "What is the capital of France?"}]
        >>> len(chat.render_prompt(messages))
        47
        >>> print(chat.enc.decode(fit_prompt(chat, messages, 30)))  # the oldest turn goes
        <|im_start|>system
        Be brief.<|im_end|>
        <|im_start|>user
        What is the capital of France?<|im_end|>
        <|im_start|>assistant
        <BLANKLINE>
        >>> print(chat.enc.decode(fit_prompt(chat, messages, 12)))  # then the system, the text
        <|im_start|>user
         capital of France?<|im_end|>
        <|im_start|>assistant
        <BLANKLINE>
    """
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    candidates = [system + turns[start:] for start in range(len(turns))]
    if system:
        candidates.append(turns[-1:])  # the last message without the system message
    for kept in candidates:
        ids = chat.render_prompt(kept)
        if len(ids) <= max_prompt_len:
            return ids
    last = turns[-1]
    head = chat.header(last["role"])
    tail = [chat.im_end] + chat.newline + chat.generation_prompt()
    room = max(max_prompt_len - len(head) - len(tail), 0)
    content = encode_text(chat.enc, last["content"])
    return head + content[len(content) - room:] + tail
