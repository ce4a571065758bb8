"""The command-line flags of train_sft.py and train_dpo.py, each with its default and
help text (`python train_dpo.py --help`; docs/flags.md lists them all): those both stages
share, the model shape, and DPO's own. The scripts read them with parse_sft_args and
parse_dpo_args; nothing here runs during training.
"""

import argparse
import os
import shlex
from dataclasses import fields

import data
import devices
import tokenizer
from errors import ArgumentParser, UserError, run_main
from extras import losses, variant_state
from loss import LOSS_TYPES, REFERENCE_FREE_LOSSES, SMOOTHED_LOSSES
from model import PRESETS, ModelConfig, Transformer, make_config
from training import DTYPES

# beta when --beta is not given: 2.0 was chosen on TinyChat's dev split (docs/results.md);
# on other data the paper's 0.1 (Rafailov et al. 2023 used 0.1-0.5; TRL's default is 0.1)
TINYCHAT_BETA, PAPER_BETA = 2.0, 0.1

# The flags that define a run, by stage: --resume refuses to continue another
# (checkpoint.run_identity); flags that change no number (--eval-every, --quiet) are not
# here, nor --grad-accum (it splits the same global batch: memory, not the run)
SFT_RUN_KEYS = ("batch_size", "max_len", "seed", "lr", "min_lr_ratio",
                "warmup_steps", "weight_decay", "grad_clip", "epochs", "steps", "dtype",
                "group_by_length")
RUN_KEYS = {"sft": SFT_RUN_KEYS,
            "dpo": (*SFT_RUN_KEYS, "max_prompt_len", "beta", "loss", "label_smoothing",
                    "sft_alpha", "reference_free", *losses.RUN_KEYS, *variant_state.RUN_KEYS)}


def parse_sft_args(argv, description):
    """train_sft.py's flags."""
    parser = stage_parser(description, "sft_train.jsonl", "sft_val.jsonl",
                          "SFT training file", "SFT validation file")
    add_model_args(parser)
    add_training_args(parser, dict(out_dir="out", epochs=2.0, batch_size=32, lr=2e-3,
                                   warmup_steps=50, max_len=256, eval_every=200))
    return resolve_dtype(parser.parse_args(argv))


def parse_dpo_args(argv, description):
    """train_dpo.py's flags, checked together (one line and exit status 2 when they clash)."""
    parser = stage_parser(description, "pairs_train.jsonl", "pairs_val.jsonl",
                          "preference pairs", "held-out pairs for --eval-every")
    parser.add_argument("--sft-ckpt", default=None,
                        help="SFT checkpoint: the policy's start and the reference (default: "
                        "OUT_DIR/sft.pt, trained first, as train_sft.py would, when it is "
                        "missing and the data is TinyChat's; '' = a fresh model shaped by "
                        "--preset/--dim/..., for timing runs)")
    parser.add_argument("--ref-ckpt", default=None,
                        help="the reference, if not the --sft-ckpt the policy starts from "
                        "(e.g. tools/iterate.py: a later round's policy against the SFT model)")
    parser.add_argument("--sft-flags", default="",
                        help="train_sft.py flags for that first SFT stage, e.g. '--steps 100'")
    parser.add_argument("--beta", type=float, default=None,
                        help=f"DPO beta: strength of the KL penalty to the reference (default: "
                        f"{TINYCHAT_BETA} on TinyChat, chosen on its dev split, docs/results.md; "
                        f"{PAPER_BETA}, the paper's, on any other data)")
    parser.add_argument("--loss", default="sigmoid", choices=LOSS_TYPES,
                        help="sigmoid is DPO (Eq. 7), ipo in loss.dpo_loss; the others are "
                        "variants, each with its formula and paper in extras/losses.py")
    parser.add_argument("--label-smoothing", type=float, default=0.0,
                        help="conservative DPO (sigmoid, simpo) and robust DPO: assumed "
                        "share of flipped labels")
    parser.add_argument("--sft-alpha", type=float, default=0.0,
                        help="RPO: weight of the chosen answers' token-mean NLL added to the "
                        "loss (0: plain DPO, Eq. 7)")
    parser.add_argument("--reference-free", action="store_true",
                        help="no reference model (its log-probs are taken as 0)")
    parser.add_argument("--max-prompt-len", type=int, default=128,
                        help="prompts are cut from the left to this many tokens")
    parser.add_argument("--packed", action="store_true",
                        help="speed: each pair's prompt once for chosen and rejected and no "
                        "padding in the matmuls (extras/packed.py); the same numbers")
    parser.add_argument("--precompute-ref", action="store_true",
                        help="compute the reference log-probs once, cache them on disk and "
                        "free the reference model: no reference forward per step")
    losses.add_args(parser)  # the variants' own flags
    variant_state.add_args(parser)
    add_model_args(parser)
    add_training_args(parser, dict(out_dir="out", epochs=1.0, batch_size=16, lr=1e-4,
                                   warmup_steps=20, max_len=256, eval_every=100))
    args = resolve_dtype(parser.parse_args(argv))
    args.beta, args.beta_source = choose_beta(args.beta, is_tinychat(args.data))
    # the SFT checkpoint: --sft-ckpt, or OUT_DIR/sft.pt, which train_dpo.py trains first
    # (sft_stage_argv) when it is missing
    args.sft_first = args.sft_ckpt is None and not os.path.exists(
        os.path.join(args.out_dir, "sft.pt"))
    if args.sft_ckpt is None:
        args.sft_ckpt = os.path.join(args.out_dir, "sft.pt")
    variant_state.check_args(parser, args, REFERENCE_FREE_LOSSES)
    if not 0 <= args.label_smoothing < 0.5:
        parser.error("--label-smoothing must be in [0, 0.5)")
    if args.label_smoothing and args.loss not in SMOOTHED_LOSSES:
        parser.error(f"--label-smoothing acts on --loss {'/'.join(SMOOTHED_LOSSES)} only, "
                     f"not {args.loss}")
    if args.ref_ckpt and (args.reference_free or args.loss in REFERENCE_FREE_LOSSES):
        parser.error(f"--ref-ckpt names a reference, but --reference-free and --loss "
                     f"{'/'.join(REFERENCE_FREE_LOSSES)} use none")
    return args


def resolve_dtype(args):
    """--dtype auto -> this machine's dtype (devices.auto_dtype); args.dtype_auto says it
    was chosen so (checkpoints record the dtype the run used)."""
    args.dtype_auto = args.dtype == "auto"
    if args.dtype_auto:
        args.dtype = devices.auto_dtype(args.device)
    return args


def sft_stage_argv(args, log):
    """The train_sft.py flags of the SFT stage train_dpo.py runs first when OUT_DIR/sft.pt
    is missing (said in one line): on TinyChat's data, its out-dir, device, seed and
    --sft-flags; on other data a UserError that says how (its SFT data is the user's)."""
    if not (is_tinychat(args.data) and args.tokenizer == tokenizer.DEFAULT_TOKENIZER):
        raise UserError(f"no SFT checkpoint at {args.sft_ckpt}: train one on your own SFT data "
                        f"first (python train_sft.py --data SFT.jsonl --out-dir {args.out_dir}),"
                        " or pass --sft-ckpt PATH")
    argv = ["--out-dir", args.out_dir, "--device", args.device, "--seed", str(args.seed),
            *(["--quiet"] if args.quiet else []), *shlex.split(args.sft_flags)]
    log(f"no SFT checkpoint at {args.sft_ckpt}: training it first, as train_sft.py "
        f"{' '.join(argv)}")
    return argv


def total_steps(args, steps_per_epoch, n_examples):
    """Optimizer steps for the run: --steps, or --epochs over the data; a UserError when
    the data holds fewer than one global batch."""
    if steps_per_epoch == 0:
        raise UserError(f"{args.data}: {n_examples} examples are fewer than one global batch "
                        f"(--batch-size {args.batch_size})")
    return args.steps if args.steps is not None else max(1, int(args.epochs * steps_per_epoch))


def last_step(args, start_step, n_steps):
    """Where this run stops: the end of the schedule, or earlier with --stop-after."""
    return n_steps if args.stop_after is None else min(n_steps, start_step + args.stop_after)


def check_max_len(max_len, config):
    """--max-len must fit the model's context (else the first long batch would fail)."""
    if max_len > config.max_seq_len:
        raise UserError(f"--max-len {max_len} is longer than the model's context "
                        f"(max_seq_len {config.max_seq_len})")


def is_tinychat(path):
    """Whether path is one of the shipped TinyChat files in DATA_DIR."""
    return os.path.dirname(os.path.realpath(path)) == os.path.realpath(data.DATA_DIR)


def choose_beta(beta, on_tinychat):
    """(beta, why): the --beta given, else TINYCHAT_BETA on TinyChat, else PAPER_BETA."""
    if beta is not None:
        return beta, "--beta"
    if on_tinychat:
        return TINYCHAT_BETA, "the default chosen on TinyChat's dev split; --beta to change"
    return PAPER_BETA, "the DPO paper's, the default on data other than TinyChat; --beta to change"


def stage_parser(description, data_file, val_file, data_help, val_help):
    """A parser with the flags naming a stage's inputs."""
    parser = ArgumentParser(description=description,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default=os.path.join(data.DATA_DIR, data_file),
                        help=f"{data_help} (.jsonl or .json, any supported format)")
    parser.add_argument("--val-data", default=os.path.join(data.DATA_DIR, val_file),
                        help=f"{val_help} ('' for none)")
    parser.add_argument("--tokenizer", default=tokenizer.DEFAULT_TOKENIZER,
                        help=".tiktoken file (train one with python tokenizer.py)")
    parser.add_argument("--samples", type=int, default=6,
                        help="greedy answers printed at the end: to held-out TinyChat prompts "
                        "(judged) on TinyChat data, else to the first --val-data prompts")
    return parser


def add_training_args(parser, defaults):
    """Flags both stages share; `defaults` holds the stage's own default values."""
    a = parser.add_argument
    a("--out-dir", default=defaults["out_dir"], help="where checkpoints and metrics go")
    a("--epochs", type=float, default=defaults["epochs"], help="passes over the training data")
    a("--steps", type=int, default=None,
      help="exactly this many optimizer steps (overrides --epochs)")
    a("--batch-size", type=int, default=defaults["batch_size"],
      help="examples per optimizer step, the global batch: under torchrun each of the N "
      "processes takes 1/N of it, so every launcher trains the same run")
    a("--grad-accum", type=int, default=1,
      help="micro-steps per optimizer step: each process's share of the batch in this many "
      "pieces (less memory, the same run)")
    a("--lr", type=float, default=defaults["lr"], help="peak learning rate")
    a("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of --lr")
    a("--warmup-steps", type=int, default=defaults["warmup_steps"], help="linear warm-up steps")
    a("--weight-decay", type=float, default=0.1, help="AdamW decay on matrices only")
    a("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    a("--max-len", type=int, default=defaults["max_len"], help="longest sequence in tokens")
    a("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
      help="autocast dtype; auto: bfloat16 on a CPU with bf16 instructions (AVX512-BF16, "
      "AMX, Arm BF16; faster there), else float32; float16 also enables a GradScaler; "
      "float32 on CUDA multiplies in TF32 (fp32 accumulation); the output head is fp32 "
      "in every dtype")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a("--seed", type=int, default=1337, help="seed for initialisation and data order")
    a("--group-by-length", action=argparse.BooleanOptionalAction, default=True,
      help="batch examples of similar length together: about 2x less padding on TinyChat")
    a("--eval-every", type=int, default=defaults["eval_every"],
      help="validate every N steps (0: only at the end)")
    a("--log-every", type=int, default=10, help="write metrics every N steps")
    a("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    a("--resume", action="store_true", help="continue from the checkpoint in --out-dir")
    a("--stop-after", type=int, default=None,
      help="stop (and save) after N steps of this run; the schedule still spans the whole "
      "run, so a later --resume continues it (for time-limited jobs)")
    a("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    a("--chunked-head", action="store_true", help="log-probs through extras/chunked_head.py: "
      "same numbers, no (N, V) logits tensor: for large vocabularies")
    a("--no-save", action="store_true", help="write no checkpoint (for timing runs)")
    a("--skip-invalid", action="store_true", help="skip bad data records (counted) instead "
      "of stopping at the first")
    a("--quiet", action="store_true", help="no progress bar")
    a("--wandb", default=None, metavar="PROJECT", help="also log the metrics.jsonl records "
      "to this Weights & Biases project (pip install wandb; WANDB_MODE=offline works)")


def add_model_args(parser):
    """Command-line flags for the model shape: --preset and one flag per ModelConfig field."""
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                        help="named model shape; the flags below override single fields")
    for f in fields(ModelConfig):
        if f.name == "vocab_size":
            continue  # always taken from the tokenizer
        flag, help = "--" + f.name.replace("_", "-"), f"override {f.name} (default: the preset's)"
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=help)
        else:
            parser.add_argument(flag, type=type(f.default), default=None, help=help)


def config_from_args(args, vocab_size):
    overrides = {f.name: getattr(args, f.name) for f in fields(ModelConfig)
                 if f.name != "vocab_size"}
    return make_config(args.preset, vocab_size=vocab_size, **overrides)


def main():
    """python flags.py --preset minimind: the shape and parameter count of a model's flags."""
    parser = ArgumentParser(description="Print a model shape and its size.")
    add_model_args(parser)
    parser.add_argument("--vocab-size", type=int, default=6400, help="vocabulary size")
    args = parser.parse_args()
    config = config_from_args(args, args.vocab_size)
    print(config)
    print(f"parameters: {Transformer(config).num_params():,}")


if __name__ == "__main__":
    run_main(main)
