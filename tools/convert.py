"""MiniMind checkpoints in and out: a MiniMind model aligned with minidpo, and back.

MiniMind's trainers save a plain `state_dict` (`full_sft_768.pth`, `dpo_768.pth`:
keys such as `model.layers.0.self_attn.q_proj.weight`); its tokenizer is a
Hugging Face byte-level BPE `tokenizer.json`. Nothing is downloaded: bring the
files from your MiniMind checkout.

    python -m tools.convert --from-minimind full_sft_768.pth --tokenizer-dir minimind/model \\
        --out out/minimind/sft.pt
    python train_dpo.py --sft-ckpt out/minimind/sft.pt \\
        --tokenizer out/minimind/minimind.tiktoken --data dpo.jsonl --out-dir out/minimind
    python -m tools.convert --to-minimind out/minimind/dpo.pt --out dpo_768.pth

--from-minimind infers the shape from the tensors (dense or MoE, q/k-norm or not)
and is strict: a key it does not map is an error that names it. The tokenizer is
converted alongside (tokenizer.convert_hf_tokenizer) and carries MiniMind's chat
template, so training renders the text MiniMind was trained on. --to-minimind
writes our weights in MiniMind's layout (fp32) and prints the MiniMindConfig
arguments that load them.
"""

import os
import pickle
import re

import torch

import tokenizer
from errors import ArgumentParser, UserError, run_main
from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint, save_tensors
from model import ModelConfig, Transformer

MINIMIND_NORM_EPS = 1e-6  # MiniMindConfig.rms_norm_eps
MINIMIND_ROPE_THETA = 1e6  # MiniMindConfig.rope_theta
MINIMIND_MAX_POSITIONS = 32768  # MiniMindConfig.max_position_embeddings


def key_map(config):
    """[(our key, [MiniMind keys])]: where each of our tensors comes from. Ours fuses q, k, v
    into one matrix (wqkv) and gate and up into another (w13); the list order is the
    order they are stacked in (dim 0)."""
    pairs = [("tok_embeddings.weight", ["model.embed_tokens.weight"]),
             ("norm.weight", ["model.norm.weight"])]
    for i in range(config.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        attn = theirs + "self_attn."
        pairs += [(ours + "attn_norm.weight", [theirs + "input_layernorm.weight"]),
                  (ours + "attn.wqkv.weight", [attn + "q_proj.weight", attn + "k_proj.weight",
                                               attn + "v_proj.weight"]),
                  (ours + "attn.wo.weight", [attn + "o_proj.weight"]),
                  (ours + "ffn_norm.weight", [theirs + "post_attention_layernorm.weight"])]
        if config.qk_norm:
            pairs += [(ours + "attn.q_norm.weight", [attn + "q_norm.weight"]),
                      (ours + "attn.k_norm.weight", [attn + "k_norm.weight"])]
        ffns = [(ours + "ffn.", theirs + "mlp.")]
        if config.n_experts:
            pairs.append((ours + "ffn.router.weight", [theirs + "mlp.gate.weight"]))
            ffns = [(ours + f"ffn.experts.{e}.", theirs + f"mlp.experts.{e}.")
                    for e in range(config.n_experts)]
        for ffn, mlp in ffns:
            pairs += [(ffn + "w13.weight", [mlp + "gate_proj.weight", mlp + "up_proj.weight"]),
                      (ffn + "w2.weight", [mlp + "down_proj.weight"])]
    return pairs


def infer_config(state, n_heads, experts_per_token):
    """Our ModelConfig for a MiniMind state_dict, read off the tensor shapes. The head
    size comes from q_norm when the model has it (else from n_heads); experts_per_token
    is not in the weights at all (MiniMind's default is 1)."""
    def get(key):
        if key not in state:
            raise UserError(f"not a MiniMind state_dict: no '{key}'")
        return state[key]
    vocab_size, dim = get("model.embed_tokens.weight").shape
    n_layers = 1 + max(int(m.group(1)) for k in state
                       if (m := re.match(r"model\.layers\.(\d+)\.", k)))
    attn = "model.layers.0.self_attn."
    qk_norm = attn + "q_norm.weight" in state
    if not qk_norm and n_heads is None:
        raise UserError("this MiniMind model has no q/k-norm, so its head count is not in the "
                        "weights: pass --n-heads (num_attention_heads in its MiniMindConfig)")
    head_dim = state[attn + "q_norm.weight"].shape[0] if qk_norm else dim // n_heads
    q_rows, kv_rows = get(attn + "q_proj.weight").shape[0], get(attn + "k_proj.weight").shape[0]
    if q_rows != dim:
        raise UserError(f"heads x head size ({q_rows}) differs from the width ({dim}): "
                         f"minidpo's attention needs them equal")
    n_experts = state["model.layers.0.mlp.gate.weight"].shape[0] if (
        "model.layers.0.mlp.gate.weight" in state) else 0
    if n_experts and not 1 <= experts_per_token <= n_experts:
        raise UserError(f"--experts-per-token {experts_per_token}: this model has "
                        f"{n_experts} experts")
    mlp = "model.layers.0.mlp." + ("experts.0." if n_experts else "")
    return ModelConfig(vocab_size=vocab_size, dim=dim, n_layers=n_layers,
                       n_heads=q_rows // head_dim, n_kv_heads=kv_rows // head_dim,
                       ffn_dim=get(mlp + "gate_proj.weight").shape[0],
                       max_seq_len=MINIMIND_MAX_POSITIONS, rope_theta=MINIMIND_ROPE_THETA,
                       norm_eps=MINIMIND_NORM_EPS, qk_norm=qk_norm, n_experts=n_experts,
                       experts_per_token=experts_per_token if n_experts else 2)


def read_minimind(path):
    """A MiniMind .pth state_dict, read with torch.load(weights_only=True)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refusing to load a file that holds pickled objects other "
                        f"than tensors ({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, KeyError, ValueError) as e:
        raise UserError(f"{path}: not a readable torch.save file (corrupt or cut short?): "
                        f"{str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path}: not a MiniMind state_dict (a dict of tensors)")
    return state


def from_minimind(state, n_heads=None, experts_per_token=1):
    """A Transformer holding a MiniMind state_dict's weights, exactly (no rounding)."""
    config = infer_config(state, n_heads, experts_per_token)
    if "lm_head.weight" in state and not torch.equal(state["lm_head.weight"],
                                                     state["model.embed_tokens.weight"]):
        raise UserError("lm_head.weight differs from model.embed_tokens.weight: minidpo ties "
                         "them, as MiniMind does by default")
    ours, used = {}, {"lm_head.weight"}
    for key, sources in key_map(config):
        missing = [s for s in sources if s not in state]
        if missing:
            raise UserError(f"MiniMind state_dict lacks {missing} (for {key})")
        ours[key] = torch.cat([state[s].float() for s in sources], dim=0)
        used.update(sources)
    unmapped = sorted(set(state) - used)
    if unmapped:
        raise UserError(f"MiniMind state_dict keys that minidpo does not map: {unmapped}")
    ours["output.weight"] = ours["tok_embeddings.weight"]  # tied
    model = Transformer(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k])})"
             for k, v in ours.items() if v.shape != expected[k]]
    if wrong:
        raise UserError(f"MiniMind weights do not fit the shape read off them (wrong "
                        f"--n-heads?): {', '.join(wrong[:3])}")
    model.load_state_dict(ours, strict=True)
    return model


def to_minimind(model):
    """Our model's weights as a MiniMind state_dict (fp32), lm_head tied to the embedding."""
    config, ours = model.config, model.state_dict()
    state = {}
    for key, targets in key_map(config):
        sizes = [ours[key].shape[0] // len(targets)] * len(targets)
        if key.endswith("wqkv.weight"):
            kv = config.n_kv_heads * (config.dim // config.n_heads)
            sizes = [config.dim, kv, kv]
        for target, part in zip(targets, ours[key].split(sizes, dim=0)):
            state[target] = part.detach().float().clone()
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # one tensor, two keys
    return state


def minimind_config_args(config):
    """The MiniMindConfig(...) arguments that build a model these weights load into."""
    args = dict(hidden_size=config.dim, num_hidden_layers=config.n_layers,
                num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
                intermediate_size=config.ffn_dim, vocab_size=config.vocab_size,
                use_moe=bool(config.n_experts))
    if config.n_experts:
        args.update(num_experts=config.n_experts, num_experts_per_tok=config.experts_per_token,
                    router_aux_loss_coef=config.aux_loss_coef)
    return args


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    way = parser.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-minimind", metavar="PTH", help="a MiniMind state_dict (.pth)")
    way.add_argument("--to-minimind", metavar="PT", help="a minidpo checkpoint (.pt)")
    parser.add_argument("--out", required=True, help="the file to write")
    parser.add_argument("--tokenizer-dir", help="--from-minimind: the folder with MiniMind's "
                        "tokenizer.json (its model/ folder)")
    parser.add_argument("--tokenizer-out", help="--from-minimind: where the converted "
                        "tokenizer goes (default: minimind.tiktoken beside --out)")
    parser.add_argument("--n-heads", type=int, default=None, help="--from-minimind, models "
                        "without q/k-norm (whose weights do not say): attention heads, "
                        "num_attention_heads of its MiniMindConfig")
    parser.add_argument("--experts-per-token", type=int, default=1, help="--from-minimind, "
                        "MoE: experts per token, not stored in the weights (MiniMind's "
                        "default 1)")
    args = parser.parse_args(argv)

    if args.from_minimind:
        if not args.tokenizer_dir:
            parser.error("--from-minimind needs --tokenizer-dir (the checkpoint records its "
                         "tokenizer)")
        state = read_minimind(args.from_minimind)
        model = from_minimind(state, args.n_heads, args.experts_per_token)
        tok_path = args.tokenizer_out or os.path.join(
            os.path.dirname(os.path.abspath(args.out)), "minimind.tiktoken")
        os.makedirs(os.path.dirname(os.path.abspath(tok_path)), exist_ok=True)
        enc = tokenizer.convert_hf_tokenizer(
            os.path.join(args.tokenizer_dir, "tokenizer.json"), tok_path)
        if enc.n_vocab != model.config.vocab_size:
            raise UserError(f"the tokenizer has {enc.n_vocab} tokens, the model "
                            f"{model.config.vocab_size}")
        save_checkpoint(args.out, model, tokenizer.tokenizer_identity(tok_path))
        print(f"wrote {args.out} ({model.num_params():,} parameters, {model.config}) and "
              f"{tok_path}; train with --sft-ckpt {args.out} --tokenizer {tok_path}")
    else:
        model = model_from_checkpoint(load_checkpoint(args.to_minimind), args.to_minimind)
        save_tensors(to_minimind(model), args.out)
        print(f"wrote {args.out}; load it in MiniMind with "
              f"MiniMindConfig(**{minimind_config_args(model.config)})")
        if not model.config.qk_norm or model.config.norm_eps != MINIMIND_NORM_EPS:
            print("note: MiniMind's current model has q/k-norm and RMSNorm eps 1e-6; this "
                  f"model has qk_norm={model.config.qk_norm}, norm_eps={model.config.norm_eps}"
                  ", so MiniMind's code will not reproduce its outputs")


if __name__ == "__main__":
    run_main(main)
