"""MiniMind interop against ground truth made by MiniMind's own code (tests/fixtures/
minimind, see its README): converted weights give MiniMind's logits, the round trip is
bit-equal, the converted tokenizer and chat template give MiniMind's ids, the MoE routing
and its load-balancing loss match a hand-worked example, and DPO runs on a converted model
under torchrun."""

import json
import os

import pytest
import torch

import data
import tokenizer
import train_dpo
import train_sft
from conftest import CPU, QUIET, ROOT, SHAPE, in_process, max_diff, sft_args, torchrun, weights
from checkpoint import load_checkpoint, model_from_checkpoint
from extras.moe import MoEFeedForward
from model import ModelConfig, Transformer, make_config
from tools import convert as convert_tool

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "minimind")
CASES = torch.load(os.path.join(FIXTURES, "cases.pt"), weights_only=True)
with open(os.path.join(FIXTURES, "encodings.json"), encoding="utf-8") as f:
    ENCODINGS = json.load(f)


def convert(*args):
    """`python -m tools.convert ARGS` (in this process, conftest.in_process)."""
    return in_process(convert_tool.main, *args)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Both fixture models through `convert.py --from-minimind`, with a user's flags."""
    out = tmp_path_factory.mktemp("minimind")
    for name, k in [("dense", 1), ("moe", 2)]:
        result = convert("--from-minimind", os.path.join(FIXTURES, f"{name}.pth"),
                         "--tokenizer-dir", FIXTURES, "--out", out / f"{name}.pt",
                         "--experts-per-token", k)
        assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_converted_models_give_minimind_logits(converted, name):
    model = model_from_checkpoint(load_checkpoint(converted / f"{name}.pt")).eval()
    assert model.config.qk_norm and model.config.norm_eps == 1e-6
    assert model.config.n_experts == (4 if name == "moe" else 0)
    with torch.no_grad():
        logits = model(CASES["input_ids"])  # (2, 24, 6400)
    assert (logits - CASES[f"{name}_logits"]).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_round_trip_to_minimind_is_bit_equal(converted, tmp_path, name):
    result = convert("--to-minimind", converted / f"{name}.pt", "--out", tmp_path / "back.pth")
    assert result.returncode == 0, result.stderr
    assert "MiniMindConfig(**{'hidden_size': 64" in result.stdout
    original = torch.load(os.path.join(FIXTURES, f"{name}.pth"), weights_only=True)
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert set(back) == set(original)
    for key in original:
        assert back[key].dtype == original[key].dtype and torch.equal(back[key], original[key])


def test_a_model_without_qk_norm_needs_its_head_count(tmp_path):
    """Without q/k-norm the weights do not say how many heads there are (4 heads of 8 and
    8 of 4 have the same shapes, and different logits): convert.py asks for --n-heads,
    and with the right one gives the same logits. A wrong --experts-per-token is refused,
    never clamped."""
    from tools.convert import to_minimind
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=6400, dim=32, n_layers=2, n_heads=4,
                                    n_kv_heads=2, norm_eps=1e-6)).eval()  # MiniMind's eps
    torch.save(to_minimind(model), tmp_path / "plain.pth")
    args = ["--from-minimind", tmp_path / "plain.pth", "--tokenizer-dir", FIXTURES, "--out",
            tmp_path / "plain.pt"]
    result = convert(*args)
    assert result.returncode == 1 and "pass --n-heads" in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert convert(*args, "--n-heads", "4").returncode == 0
    back = model_from_checkpoint(load_checkpoint(tmp_path / "plain.pt")).eval()
    ids = torch.randint(0, 6400, (2, 12))
    with torch.no_grad():
        assert (back(ids) - model(ids)).abs().max().item() < 1e-5
    result = convert("--from-minimind", os.path.join(FIXTURES, "moe.pth"), "--tokenizer-dir",
                     FIXTURES, "--out", tmp_path / "moe.pt", "--experts-per-token", "7")
    assert result.returncode == 1
    assert result.stderr == "error: --experts-per-token 7: this model has 4 experts\n"


def test_a_key_that_is_not_mapped_is_an_error_that_names_it(tmp_path):
    state = torch.load(os.path.join(FIXTURES, "dense.pth"), weights_only=True)
    state["model.layers.0.self_attn.rotary.inv_freq"] = torch.zeros(8)
    torch.save(state, tmp_path / "odd.pth")
    result = convert("--from-minimind", tmp_path / "odd.pth", "--tokenizer-dir", FIXTURES,
                     "--out", tmp_path / "odd.pt")
    assert result.returncode != 0
    assert "model.layers.0.self_attn.rotary.inv_freq" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def mm_enc(converted):
    return tokenizer.load_tokenizer(str(converted / "minimind.tiktoken"))


def test_converted_tokenizer_encodes_every_text_as_minimind(mm_enc):
    assert mm_enc.n_vocab == 6400
    for token, i in ENCODINGS["special_tokens"].items():  # specials at ids 0..35
        assert mm_enc.encode_single_token(token) == i
    for case in ENCODINGS["texts"]:
        ours = tokenizer.encode_text(mm_enc, case["text"])
        assert mm_enc.decode(ours) == case["text"]
        if "<|im_end|>" not in case["text"]:
            assert ours == case["ids"], case["text"]
        else:
            # The deliberate exception: MiniMind turns a literal "<|im_end|>" typed in a
            # message into the special id 2, which lets data forge a turn boundary. We keep
            # it plain bytes; the text around it encodes as MiniMind's does.
            before, after = case["text"].split("<|im_end|>")
            assert 2 in case["ids"] and min(ours) >= len(ENCODINGS["special_tokens"])
            assert case["ids"] == (tokenizer.encode_text(mm_enc, before) + [2]
                                   + tokenizer.encode_text(mm_enc, after))


def test_minimind_chat_template_renders_minimind_ids(mm_enc):
    chat = data.Chat(mm_enc)
    assert chat.template == "minimind"  # named by the converted tokenizer's sidecar
    for case in ENCODINGS["chats"]:
        ids, mask = chat.render(case["messages"])
        assert ids == case["ids"]
        assert chat.render_prompt(case["messages"][:-1]) == case["prompt_ids"]
        # the loss covers each answer and its <|im_end|>; the empty think block is prompt
        answers = [m["content"] + "<|im_end|>" for m in case["messages"]
                   if m["role"] == "assistant"]
        assert mm_enc.decode([t for t, m in zip(ids, mask) if m]) == "".join(answers)
    ids, mask = chat.render([{"role": "user", "content": "2+2?"},
                             {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}])
    assert mm_enc.decode([t for t, m in zip(ids, mask) if m]) == \
        "<think>\nadd\n</think>\n\n4<|im_end|>"  # reasoning is trained on


def test_moe_routing_and_load_balancing_loss_by_hand():
    """3 experts, 2 per token, router = identity on 3 channels, so the router logits are
    the token itself. Token 1: probabilities [0.5, 0.3, 0.2] -> experts 0 and 1 with
    weights 0.625 and 0.375. Token 2: [0.2, 0.3, 0.5] -> experts 2 and 1, 0.625 and 0.375.
    Loads (share of tokens per expert): [1/2, 1, 1/2]; mean probabilities [0.35, 0.3,
    0.35]; aux = coef * 3 * (0.175 + 0.3 + 0.175) = 1.95 * coef."""
    config = ModelConfig(vocab_size=8, dim=3, n_heads=1, n_kv_heads=1, ffn_dim=4,
                         n_experts=3, experts_per_token=2, aux_loss_coef=1.0)
    moe = MoEFeedForward(config)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(3))
    x = torch.log(torch.tensor([[[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]]]))  # (1, 2, 3)
    y = moe(x)
    e = [expert(x[0]) for expert in moe.experts]  # each expert on both tokens
    assert torch.allclose(y[0, 0], 0.625 * e[0][0] + 0.375 * e[1][0], atol=1e-6)
    assert torch.allclose(y[0, 1], 0.625 * e[2][1] + 0.375 * e[1][1], atol=1e-6)
    assert moe.aux_loss.item() == pytest.approx(1.95, rel=1e-6)


def test_presets_have_the_parameter_counts_of_their_formula():
    def formula(C, L, H, Hkv, F, V, experts=0, qk_norm=False):
        D = C // H
        attn = C * (C + 2 * Hkv * D) + C * C + (2 * D if qk_norm else 0)
        ffn = 3 * C * F * max(experts, 1) + (C * experts if experts else 0)
        return V * C + L * (attn + ffn + 2 * C) + C  # tied head; 2 norms a block + final
    assert Transformer(make_config("minimind", vocab_size=6400)).num_params() == formula(
        512, 8, 8, 2, 1408, 6400)
    for preset, experts in [("minimind-768", 0), ("minimind-768-moe", 4)]:
        n = Transformer(make_config(preset, vocab_size=6400)).num_params()
        assert n == formula(768, 8, 8, 4, 2432, 6400, experts, qk_norm=True)
    assert Transformer(make_config("minimind-768", vocab_size=6400)).num_params() == 63_912_192


def minimind_pairs(path, n=16):
    """Pairs in MiniMind's dpo.jsonl format: whole conversations, the prompt implicit."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            user = {"role": "user", "content": f"What is {i} + {i}?"}
            f.write(json.dumps({
                "chosen": [user, {"role": "assistant", "content": f"{2 * i}."}],
                "rejected": [user, {"role": "assistant", "content": f"I think {2 * i + 1}, "
                                    "but who knows, honestly."}]}) + "\n")
    return str(path)


def test_dpo_on_a_converted_minimind_model_two_ranks_equal_one(converted, tmp_path):
    pairs = minimind_pairs(tmp_path / "dpo.jsonl")
    args = ["--data", pairs, "--val-data", "", "--sft-ckpt", str(converted / "dense.pt"),
            "--tokenizer", str(converted / "minimind.tiktoken"), "--steps", "3",
            "--lr", "1e-4", "--warmup-steps", "1", "--sft-alpha", "0", "--batch-size", "4",
            *QUIET, *CPU]  # float32: 2 ranks against 1 to 1e-5
    train_dpo.main(args + ["--out-dir", str(tmp_path / "one")])
    torchrun("train_dpo.py", args + ["--out-dir", str(tmp_path / "two")])  # 2 pairs a rank
    one, two = weights(tmp_path / "one/dpo.pt"), weights(tmp_path / "two/dpo.pt")
    assert max_diff(one, two) < 1e-5
    assert max_diff(one, weights(converted / "dense.pt")) > 1e-4  # it did train (Adam: ~lr)
    # and the result goes back to MiniMind's layout
    result = convert("--to-minimind", tmp_path / "one/dpo.pt", "--out", tmp_path / "dpo.pth")
    assert result.returncode == 0, result.stderr


def test_moe_load_balancing_loss_is_trained_and_logged(converted, files, tmp_path):
    """SFT with --n-experts through the script: the aux loss is logged, and it trains the
    routers (with --aux-loss-coef 0 it is 0 and the routers end elsewhere). Then DPO of a
    converted MiniMind MoE model under torchrun (every expert's parameters in DDP's graph,
    used or not): the logged loss is its terms' sum, and the routers move."""
    moe = ["--steps", "2", "--batch-size", "8", "--n-experts", "4", "--experts-per-token", "2",
           "--log-every", "1"]
    train_sft.main(sft_args(files, tmp_path / "sft", *moe))
    train_sft.main(sft_args(files, tmp_path / "noaux", *moe, "--aux-loss-coef", "0"))
    assert all(r["loss/aux"] > 0 for r in records(tmp_path / "sft/sft/metrics.jsonl"))
    assert all(r["loss/aux"] == 0 for r in records(tmp_path / "noaux/sft/metrics.jsonl"))
    with_aux, without = weights(tmp_path / "sft/sft.pt"), weights(tmp_path / "noaux/sft.pt")
    routers = [k for k in with_aux if k.endswith("ffn.router.weight")]
    assert len(routers) == int(SHAPE[SHAPE.index("--n-layers") + 1])
    assert max((with_aux[k] - without[k]).abs().max().item() for k in routers) > 0
    pairs = minimind_pairs(tmp_path / "dpo.jsonl")
    torchrun("train_dpo.py", ["--data", pairs, "--val-data", "", "--sft-ckpt",
                              str(converted / "moe.pt"), "--tokenizer",
                              str(converted / "minimind.tiktoken"), "--steps", "2",
                              "--batch-size", "2", "--log-every", "1",
                              "--out-dir", str(tmp_path / "dpo"), *QUIET])
    logged = records(tmp_path / "dpo/dpo/metrics.jsonl")
    assert len(logged) == 2
    for r in logged:
        assert r["loss/aux"] > 0
        assert r["loss"] == pytest.approx(r["loss/dpo"] + r["loss/aux"], rel=1e-6)
    before, after = weights(converted / "moe.pt"), weights(tmp_path / "dpo/dpo.pt")
    routers = [k for k in before if k.endswith("ffn.router.weight")]
    assert routers and max((after[k] - before[k]).abs().max().item() for k in routers) > 0


def records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_dpo_pairs_with_reasoning_are_refused_with_the_minimind_template(mm_enc, tmp_path):
    think = {"role": "assistant", "content": "<think>\nhmm\n</think>\n\n4"}
    path = minimind_pairs(tmp_path / "dpo.jsonl", n=2)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"chosen": [{"role": "user", "content": "2+2?"}, think],
                            "rejected": [{"role": "user", "content": "2+2?"},
                                         {"role": "assistant", "content": "5"}]}) + "\n")
    with pytest.raises(ValueError, match=r"dpo.jsonl: valid pair 3: .*<think> reasoning"):
        data.PreferenceDataset(path, mm_enc, log=None)


def test_tokenizer_out_puts_the_converted_tokenizer_where_asked(tmp_path):
    result = convert("--from-minimind", os.path.join(FIXTURES, "dense.pth"), "--tokenizer-dir",
                     FIXTURES, "--out", tmp_path / "ckpt" / "sft.pt", "--tokenizer-out",
                     tmp_path / "tok" / "mm.tiktoken")
    assert result.returncode == 0, result.stderr
    enc = tokenizer.load_tokenizer(str(tmp_path / "tok" / "mm.tiktoken"))
    assert enc.chat_template == "minimind" and os.path.exists(tmp_path / "tok/mm.tiktoken.json")
    assert load_checkpoint(tmp_path / "ckpt" / "sft.pt")["tokenizer"] == \
        tokenizer.tokenizer_identity(str(tmp_path / "tok" / "mm.tiktoken"))
    assert not os.path.exists(tmp_path / "ckpt" / "minimind.tiktoken")
