"""Chat template, readers for every format, errors for bad input, truncation, batching."""

import pytest
import torch

import data
import formats
import tokenizer
from errors import UserError

SYS, USER, ASSISTANT = "system", "user", "assistant"


def test_chat_mask_of_a_two_turn_conversation_with_system(enc):
    chat = data.Chat(enc)
    ids, mask = chat.render([
        {"role": SYS, "content": "Be kind."}, {"role": USER, "content": "Hi"},
        {"role": ASSISTANT, "content": "Hello!"}, {"role": USER, "content": "What is 2 + 2?"},
        {"role": ASSISTANT, "content": "2 + 2 = 4."}])
    S, E, NL = 1534, 1535, 10  # <|im_start|>, <|im_end|>, "\n"
    expected = [
        (S, 0), (327, 0), (NL, 0), (538, 0), (525, 0), (46, 0), (E, 0), (NL, 0),  # system
        (S, 0), (271, 0), (NL, 0), (72, 0), (105, 0), (E, 0), (NL, 0),  # user: H i
        (S, 0), (267, 0), (NL, 0),  # <|im_start|>assistant\n
        (72, 1), (328, 1), (111, 1), (33, 1), (E, 1), (NL, 0),  # H ell o ! <|im_end|>
        (S, 0), (271, 0), (NL, 0),  # <|im_start|>user\n
        (316, 0), (284, 0), (32, 0), (50, 0), (367, 0), (32, 0), (50, 0), (63, 0), (E, 0),
        (NL, 0), (S, 0), (267, 0), (NL, 0),
        (50, 1), (367, 1), (32, 1), (50, 1), (330, 1), (32, 1), (52, 1), (46, 1), (E, 1),
        (NL, 0)]
    assert list(zip(ids, mask)) == expected
    assert enc.decode([i for i, m in expected if m]) == "Hello!<|im_end|>2 + 2 = 4.<|im_end|>"


def test_prompt_plus_response_equals_full_render(enc):
    chat = data.Chat(enc)
    prompt = [{"role": USER, "content": "Hi"}]
    reply = [{"role": ASSISTANT, "content": "Hello there"}]
    ids, mask = chat.render(prompt + reply)
    r_ids, r_mask = chat.render_response(reply)
    assert chat.render_prompt(prompt) + r_ids + chat.newline == ids
    assert [0] * len(chat.render_prompt(prompt)) + r_mask + [0] == mask


SFT_FORMATS = {
    "messages": {"messages": [{"role": "user", "content": "Q"},
                              {"role": "assistant", "content": "A"}]},
    "minimind": {"conversations": [{"role": "user", "content": "Q"},
                                   {"role": "assistant", "content": "A"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Q"},
                                   {"from": "gpt", "value": "A"}]},
    "alpaca": {"instruction": "Q", "input": "", "output": "A"},
}


@pytest.mark.parametrize("fmt", sorted(SFT_FORMATS))
@pytest.mark.parametrize("ext", ["jsonl", "json"])
def test_every_sft_format(fmt, ext, write_file, enc):
    path = write_file(f"sft.{ext}", [SFT_FORMATS[fmt]] * 3)
    ds = data.SFTDataset(path, enc)
    assert len(ds) == 3
    expected = data.Chat(enc).render([{"role": USER, "content": "Q"},
                                      {"role": ASSISTANT, "content": "A"}])
    assert ds[0] == expected


def test_alpaca_input_joins_the_instruction():
    msgs = data.sft_messages({"instruction": "Translate", "input": "chat", "output": "cat"}, "x")
    assert msgs[0] == {"role": "user", "content": "Translate\n\nchat"}


PREF_FORMATS = {
    "standard": {"prompt": "Q", "chosen": "good", "rejected": "bad"},
    "conversational": {"prompt": [{"role": "user", "content": "Q"}],
                       "chosen": [{"role": "assistant", "content": "good"}],
                       "rejected": [{"role": "assistant", "content": "bad"}]},
    "implicit": {"chosen": [{"role": "user", "content": "Q"},
                            {"role": "assistant", "content": "good"}],
                 "rejected": [{"role": "user", "content": "Q"},
                              {"role": "assistant", "content": "bad"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Q"}],
                 "chosen": {"from": "gpt", "value": "good"},
                 "rejected": {"from": "gpt", "value": "bad"}},
}


@pytest.mark.parametrize("fmt", sorted(PREF_FORMATS))
@pytest.mark.parametrize("ext", ["jsonl", "json"])
def test_every_preference_format(fmt, ext, write_file, enc):
    path = write_file(f"pairs.{ext}", [PREF_FORMATS[fmt]] * 2)
    ds = data.PreferenceDataset(path, enc)
    chat = data.Chat(enc)
    x = ds[0]
    assert x["prompt"] == chat.render_prompt([{"role": USER, "content": "Q"}])
    assert enc.decode(x["chosen"]) == "good<|im_end|>"
    assert enc.decode(x["rejected"]) == "bad<|im_end|>"
    assert x["chosen_mask"] == [1] * len(x["chosen"])


GOOD = '{"prompt": "Q", "chosen": "a", "rejected": "b"}\n'
BAD_INPUTS = {
    "invalid JSON": (GOOD + '{"prompt": "Q", "chosen": \n', 2, "invalid JSON"),
    "missing key": (GOOD + '{"prompt": "Q", "chosen": "a"}\n', 2, "missing key 'rejected'"),
    "wrong type": (GOOD + '{"prompt": "Q", "chosen": 5, "rejected": "b"}\n', 2,
                   "'chosen' must be a string or a list of messages, got int"),
    "empty content": (GOOD + '{"prompt": "Q", "chosen": "  ", "rejected": "b"}\n', 2,
                      "'chosen' is empty"),
    "unknown role": (GOOD + '{"prompt": [{"role": "robot", "content": "Q"}], "chosen": "a", '
                     '"rejected": "b"}\n', 2, "unknown role 'robot'"),
    "non-UTF-8": ((GOOD + '{"prompt": "Q\xff", "chosen": "a", "rejected": "b"}\n')
                  .encode("latin-1"), 2, "not valid UTF-8"),
    "BOM": (b"\xef\xbb\xbf" + GOOD.encode(), 1, "byte-order mark"),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_names_file_and_line(kind, write_file, enc):
    content, line, words = BAD_INPUTS[kind]
    path = write_file("bad.jsonl", content)
    with pytest.raises(ValueError) as err:
        data.PreferenceDataset(path, enc)
    assert f"{path}:{line}:" in str(err.value) and words in str(err.value)


@pytest.mark.parametrize("kind", sorted(set(BAD_INPUTS) - {"BOM"}))
def test_skip_invalid_counts_and_reports(kind, write_file, enc):
    content, _, _ = BAD_INPUTS[kind]
    path = write_file("bad.jsonl", content)
    logged = []
    ds = data.PreferenceDataset(path, enc, skip_invalid=True, log=logged.append)
    assert len(ds) == 1 and sum(ds.skipped.values()) == 1
    assert "skipped 1 invalid records" in logged[0]


def test_empty_file_is_an_error(write_file, enc):
    for content in ["", "\n\n"]:
        path = write_file("empty.jsonl", content)
        with pytest.raises(ValueError, match="empty"):
            data.SFTDataset(path, enc)


def test_sft_bad_role_and_json_array_index(write_file, enc):
    path = write_file("sft.json", [SFT_FORMATS["messages"],
                                   {"messages": [{"role": "user", "content": "Q"}]}])
    with pytest.raises(ValueError, match=r"sft\.json\[1\]: .*no assistant message"):
        data.SFTDataset(path, enc)


def test_prompt_truncation_keeps_the_template_whole(enc):
    chat = data.Chat(enc)
    system = {"role": "system", "content": "You are a careful assistant."}
    turns = [{"role": "user", "content": "first " * 30}, {"role": "assistant", "content": "ok"},
             {"role": "user", "content": "Now tell me about " + "word " * 40}]
    full = chat.render_prompt([system] + turns)
    header_user, gen = chat.header("user"), chat.header("assistant")
    for max_prompt_len in (len(full), 80, 40, 12):
        ids = formats.fit_prompt(chat, [system] + turns, max_prompt_len)
        assert len(ids) <= max_prompt_len
        assert ids[:len(header_user)] == header_user or ids[:2] == chat.header("system")[:2]
        assert ids[-len(gen):] == gen and ids[-len(gen) - 2] == chat.im_end
        text = enc.decode(ids)
        assert text.count("<|im_start|>") == text.count("<|im_end|>") + 1  # whole turns
    assert formats.fit_prompt(chat, [system] + turns, len(full)) == full
    system_and_last = chat.render_prompt([system] + turns[-1:])  # oldest turns out
    assert formats.fit_prompt(chat, [system] + turns, len(system_and_last)) == system_and_last
    last = chat.render_prompt(turns[-1:])  # then the system message
    assert formats.fit_prompt(chat, [system] + turns, len(system_and_last) - 1) == last
    cut = formats.fit_prompt(chat, [system] + turns, 12)
    assert len(cut) == 12 and enc.decode(cut).endswith("word <|im_end|>\n<|im_start|>assistant\n")


def test_pairs_identical_after_truncation_are_dropped(write_file, enc):
    tail = " ".join(["same"] * 40)
    path = write_file("p.jsonl", [{"prompt": "Q", "chosen": tail + " good",
                                   "rejected": tail + " bad"},
                                  {"prompt": "Q", "chosen": "a", "rejected": "b"}])
    assert len(data.PreferenceDataset(path, enc, max_len=100, log=None)) == 2
    ds = data.PreferenceDataset(path, enc, max_len=30, log=None)  # the tails are cut off
    assert len(ds) == 1 and ds.dropped == {"identical chosen and rejected": 1}


def test_pairs_truncated_dropped_and_counted(write_file, enc):
    long_prompt = " ".join(["word"] * 50)
    path = write_file("p.jsonl", [
        {"prompt": "Q", "chosen": "same", "rejected": "same"},  # identical
        {"prompt": long_prompt, "chosen": "a", "rejected": "b"},  # fills max_len
        {"prompt": long_prompt, "chosen": " ".join(["yes"] * 40), "rejected": "no"},
        {"prompt": "Q", "chosen": "a", "rejected": "b"}])
    ds = data.PreferenceDataset(path, enc, max_len=30, max_prompt_len=30, log=None)
    assert ds.dropped == {"identical chosen and rejected": 1, "no response tokens left": 2}
    assert len(ds) == 1
    ds = data.PreferenceDataset(path, enc, max_len=30, max_prompt_len=20, log=None)
    assert len(ds) == 3
    for x in ds.items[:2]:
        assert len(x["prompt"]) == 20
        assert len(x["prompt"]) + len(x["chosen"]) <= 30
        assert len(x["prompt"]) + len(x["rejected"]) <= 30
    assert ds[1]["chosen"] == tokenizer.encode_text(enc, " ".join(["yes"] * 40))[:10]


def test_collate_pairs_pads_dynamically_and_shares_the_prompt(write_file, enc):
    path = write_file("p.jsonl", [{"prompt": "Q one", "chosen": "a b c d", "rejected": "e"},
                                  {"prompt": "Q", "chosen": "f", "rejected": "g h"}])
    ds = data.PreferenceDataset(path, enc)
    ids, mask = data.collate_pairs([ds[0], ds[1]], ds.pad_id)
    lengths = [len(x["prompt"]) + len(x[k]) for k in ("chosen", "rejected") for x in ds]
    assert ids.shape == (4, max(lengths))  # (2B, T): the batch's longest, not a max length
    assert torch.equal(ids[0, :len(ds[0]["prompt"])], ids[2, :len(ds[0]["prompt"])])
    assert ((ids == ds.pad_id) & (mask == 1)).sum() == 0  # padding never in the mask
    assert mask.sum().item() == sum(len(x["chosen"]) + len(x["rejected"]) for x in ds)


def test_collate_sft_worked_example():
    ids, mask = data.collate_sft([([5, 6, 7], [0, 1, 1]), ([8], [1])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[0, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize("group", [False, True])
def test_epoch_batches_deterministic_disjoint_and_sharded(group):
    """--batch-size is the global batch: 2 ranks, or 2 micro-steps, or both, take their
    shares of exactly the batches one process takes."""
    lengths = [(i * 37) % 101 for i in range(1000)]
    one = data.epoch_batches(lengths, 8, seed=1, epoch=3, group_by_length=group)
    assert one == data.epoch_batches(lengths, 8, seed=1, epoch=3, group_by_length=group)
    assert one != data.epoch_batches(lengths, 8, seed=1, epoch=4, group_by_length=group)
    assert len(one) == 1000 // 8 and all(len(b) == 8 for b in one)
    r0 = data.epoch_batches(lengths, 8, 1, 3, rank=0, world_size=2, group_by_length=group)
    r1 = data.epoch_batches(lengths, 8, 1, 3, rank=1, world_size=2, group_by_length=group)
    assert [a + b for a, b in zip(r0, r1)] == one  # 2 ranks x 4 == 1 rank x 8
    flat = [i for b in r0 + r1 for i in b]
    assert len(flat) == len(set(flat)) == 1000
    accum = data.epoch_batches(lengths, 8, 1, 3, grad_accum=2, group_by_length=group)
    assert [a + b for a, b in zip(accum[::2], accum[1::2])] == one  # 2 micro x 4 == 1 x 8
    both = [data.epoch_batches(lengths, 8, 1, 3, rank=r, world_size=2, grad_accum=2,
                               group_by_length=group) for r in (0, 1)]
    assert all(len(b) == 2 for b in both[0] + both[1])
    steps = [both[0][2 * s] + both[1][2 * s] + both[0][2 * s + 1] + both[1][2 * s + 1]
             for s in range(len(one))]
    assert steps == one


@pytest.mark.parametrize("batch, world_size, grad_accum", [(7, 2, 1), (8, 1, 3), (6, 2, 2)])
def test_a_global_batch_that_does_not_split_is_one_error_naming_both(batch, world_size,
                                                                      grad_accum):
    with pytest.raises(UserError, match=rf"^--batch-size {batch} \(the global batch\) does "
                       rf"not split over {world_size} processes x --grad-accum {grad_accum}"):
        data.BatchOrder([5] * 100, batch, 0, world_size=world_size, grad_accum=grad_accum)
