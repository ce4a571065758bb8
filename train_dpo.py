"""Stage 2: Direct Preference Optimization (DPO) of the SFT model on preference pairs.

The loss is the paper's Eq. 7 (loss.dpo_loss) on each pair's summed response log-probs
under the policy and under a frozen copy of the SFT model, the reference. The result,
out/dpo.pt, is the aligned model. train_sft.py has the same numbered sections; `diff
train_sft.py train_dpo.py` shows what DPO adds.

Run:  python train_sft.py && torchrun --standalone --nproc_per_node=2 train_dpo.py
      python train_dpo.py --data my_pairs.jsonl --beta 0.1 --loss sigmoid
"""

import argparse
import functools
import math
import os
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

import data
import devices
import tokenizer
import training
from checkpoint import save_checkpoint
from errors import ArgumentParser, UserError
from extras import losses, packed, precomputed_reference, variant_state
from loss import (LOSS_TYPES, METRIC_NAMES, PAPER_BETA, REFERENCE_FREE_LOSSES, SMOOTHED_LOSSES,
                  TINYCHAT_BETA, ChosenRejected, choose_beta, concatenated_logps, dpo_loss,
                  preference_metrics)
from model import add_model_args
from sample import show_samples

STAGE = "dpo"

# The flags that define a run (--resume refuses to continue another; training.run_identity)
RUN_KEYS = ("batch_size", "grad_accum", "max_len", "seed", "lr", "min_lr_ratio", "warmup_steps",
            "weight_decay", "grad_clip", "epochs", "steps", "dtype", "group_by_length",
            "max_prompt_len", "beta", "loss", "label_smoothing", "sft_alpha", "reference_free",
            *losses.RUN_KEYS, *variant_state.RUN_KEYS)


# ----------------------------------------------------------------------------
# 1. Arguments

def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default=os.path.join(data.DATA_DIR, "pairs_train.jsonl"),
                        help="preference pairs (.jsonl or .json, any supported format)")
    parser.add_argument("--val-data", default=os.path.join(data.DATA_DIR, "pairs_val.jsonl"),
                        help="held-out pairs for --eval-every ('' for none)")
    parser.add_argument("--tokenizer", default=tokenizer.DEFAULT_TOKENIZER,
                        help=".tiktoken file (train one with python tokenizer.py)")
    parser.add_argument("--samples", type=int, default=6,
                        help="greedy answers printed at the end: to held-out TinyChat prompts "
                        "(judged) on TinyChat data, else to the first --val-data prompts")
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
                        f"{TINYCHAT_BETA} on TinyChat, measured there, see docs/results.md; "
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
    training.add_training_args(parser, dict(out_dir="out", epochs=1.0, batch_size=8,
                                            lr=5e-5, warmup_steps=20, max_len=256,
                                            eval_every=100))
    args = parser.parse_args(argv)
    args.beta, args.beta_source = choose_beta(args.beta, data.is_tinychat(args.data))
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


def main(argv=None):
    args = parse_args(argv)

    # ------------------------------------------------------------------------
    # 2. Distributed set-up: one process per device under torchrun, else a single process
    dist_info = training.setup_distributed(args.device)
    device, is_main = dist_info.device, dist_info.is_main
    log = print if is_main else (lambda *a, **k: None)
    # DPO: beta, and the SFT model it starts from (trained first if need be)
    log(f"beta {args.beta} ({args.beta_source})")
    if args.sft_ckpt is None:
        args.sft_ckpt = os.path.join(args.out_dir, "sft.pt")
        if not os.path.exists(args.sft_ckpt):
            training.sft_stage_first(args, log)
    training.seed_everything(args.seed)
    ctx = training.autocast(device, args.dtype)
    devices.warn_if_bf16_is_emulated(device, args.dtype, log)
    ckpt_path = os.path.join(args.out_dir, f"{STAGE}.pt")

    # ------------------------------------------------------------------------
    # 3. Data
    enc = tokenizer.load_tokenizer(args.tokenizer)
    tokenizer_id = tokenizer.tokenizer_identity(args.tokenizer)
    train_ds = data.PreferenceDataset(args.data, enc, args.max_len, args.max_prompt_len,
                                      args.skip_invalid, log)
    val_ds = (data.PreferenceDataset(args.val_data, enc, args.max_len, args.max_prompt_len,
                                     args.skip_invalid, log) if args.val_data else None)
    train_lengths = train_ds.lengths()  # tokens a pair costs
    order = data.BatchOrder(train_lengths, args.batch_size, args.seed, dist_info.rank,
                            dist_info.world_size, args.grad_accum, args.group_by_length)
    if order.steps_per_epoch == 0:
        raise UserError(f"{args.data}: {len(train_ds)} pairs are fewer than one global "
                        f"batch ({args.batch_size} x {dist_info.world_size})")
    n_steps = training.total_steps(args, order.steps_per_epoch)
    log(f"{len(train_ds)} training pairs ({sum(train_lengths) / len(train_ds):.1f} tokens a "
        f"pair), {order.steps_per_epoch} steps per epoch, {n_steps} steps")

    # ------------------------------------------------------------------------
    # 4. Model (and, with --resume, the weights of the last checkpoint)
    # DPO: the policy starts from the SFT weights; the reference is a frozen copy of them.
    model = training.policy_from_sft(args, enc.n_vocab, tokenizer_id)
    model.to(device)
    reference = None
    if not args.reference_free and args.loss not in REFERENCE_FREE_LOSSES:
        reference = training.reference_model(args, model, tokenizer_id, device)  # no DDP
    run = training.run_identity(args, RUN_KEYS, dist_info.world_size, model.config)
    resume = training.load_resume(ckpt_path, args.resume, model, tokenizer_id, run)
    training.check_max_len(args.max_len, model.config)
    log(f"model: {model.num_params():,} parameters, {model.config}")
    ref_tables = {}  # --precompute-ref: every pair's reference log-probs, then no reference
    if args.precompute_ref and reference is not None:
        ref_tables = precomputed_reference.precompute(reference, train_ds, val_ds, args, run,
                                                      ctx, dist_info, log)
        reference = None  # freed: no reference forward during training
    raw_model = model  # the unwrapped model: what we save and evaluate
    model = training.wrap_model(model, args.compile, dist_info)  # compile, DDP

    # ------------------------------------------------------------------------
    # 5. Optimizer, learning-rate schedule, AMP scaler
    optimizer = training.configure_optimizer(raw_model, args.lr, args.weight_decay)
    scaler = training.make_scaler(device, args.dtype)
    start_step = training.restore_training_state(resume, optimizer, scaler, device)
    if resume is not None:
        log(f"resumed from {ckpt_path} at step {start_step}")
    metrics_log = training.MetricsLog(os.path.join(args.out_dir, STAGE, "metrics.jsonl"),
                                      is_main, resume is not None, args)
    # DPO: the loss with its hyper-parameters, fixed once for the whole run, and what some
    # variants carry from step to step (extras/variant_state.py; in checkpoints too)
    loss_fn = functools.partial(dpo_loss, beta=args.beta, loss_type=args.loss,
                                label_smoothing=args.label_smoothing,
                                dpop_lambda=args.dpop_lambda, simpo_gamma=args.simpo_gamma,
                                rdpo_alpha=args.rdpo_alpha)
    variants = variant_state.VariantState(args, reference, resume)

    # ------------------------------------------------------------------------
    # 6. Training loop
    end_step = training.last_step(args, start_step, n_steps)
    skipped_steps, pairs_seen, tokens_seen, t0 = 0, 0, 0, time.time()
    bar = tqdm(range(start_step, end_step), initial=start_step, total=n_steps,
               disable=not is_main or args.quiet, desc=STAGE)
    for step in bar:
        lr = training.lr_at(step, n_steps, args.lr, args.warmup_steps, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = order(step)  # grad_accum lists of pair indices
        step_metrics = {}
        for k, idx in enumerate(micro):
            last = k == len(micro) - 1
            sync = nullcontext() if last or dist_info.world_size == 1 else model.no_sync()
            batch = pair_batch(train_ds, idx, args, device)  # (ids, mask): 2B rows
            with sync:
                with ctx:
                    # the reference first: its activations are freed before the policy's,
                    # kept for the backward, pile up (~50 MB less peak at MiniMind's shape)
                    ref = reference_logps(reference, ref_tables.get("train"), idx, batch, args,
                                          device)
                    logps, n_tokens = pair_logps(model, batch, args)  # by name, (B,) each
                # DPO: Eq. 7 per pair, plus the optional RPO term (token-mean NLL of y_w).
                pair_losses, chosen_rewards, rejected_rewards = loss_fn(
                    logps.chosen, logps.rejected, ref.chosen, ref.rejected,
                    chosen_n_tokens=n_tokens.chosen, rejected_n_tokens=n_tokens.rejected,
                    **variants.loss_options())
                # RPO's NLL: each pair's token mean, then the batch mean (TRL pools tokens)
                nll = (-logps.chosen / n_tokens.chosen).mean()
                aux = raw_model.aux_loss  # MoE: the routers' load balancing (0 if dense)
                loss = pair_losses.mean() + args.sft_alpha * nll + aux
                scaler.scale(loss / len(micro)).backward()
            metrics = preference_metrics(pair_losses, chosen_rewards, rejected_rewards, logps)
            metrics.update({"loss": loss.detach(), "loss/nll": nll.detach(),
                            "loss/aux": aux.detach()})
            for name, v in metrics.items():
                step_metrics[name] = step_metrics.get(name, 0.0) + v / len(micro)
            pairs_seen += len(idx) * dist_info.world_size
            tokens_seen += sum(train_lengths[i] for i in idx) * dist_info.world_size
        # The AMP step: unscale (a no-op unless float16's GradScaler is on), clip, step. A
        # step with non-finite gradients is skipped, never applied (float16: the scaler
        # skips it and lowers its scale); the lr schedule and the data order still advance.
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(),
                                                   args.grad_clip or math.inf).item()
        skipped = not math.isfinite(grad_norm)
        if scaler.is_enabled() or not skipped:
            scaler.step(optimizer)  # = optimizer.step() when the scaler is off
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        skipped_steps += skipped
        values = torch.stack([step_metrics[n] for n in METRIC_NAMES])  # (M,) on device
        if dist_info.world_size > 1:
            torch.distributed.all_reduce(values)  # summed over ranks: one collective
        record = dict(zip(METRIC_NAMES, (values / dist_info.world_size).tolist()))  # 1 sync
        if not math.isfinite(record["loss"]) and args.dtype != "float16":  # fp16: scaler skips
            raise training.NonFiniteLoss(record["loss"], step, args.dtype)
        done = step + 1
        variants.after_step(done, record, skipped, raw_model)  # BCO's delta, TR-DPO's sync
        elapsed = time.time() - t0
        record.update(step=done, grad_norm=grad_norm, lr=lr, skipped_steps=skipped_steps,
                      tokens_per_s=tokens_seen / elapsed, pairs_per_s=pairs_seen / elapsed)
        if is_main:
            bar.set_postfix(loss=f"{record['loss']:.3f}",
                            acc=f"{record['rewards/accuracies']:.2f}",
                            margin=f"{record['rewards/margins']:.2f}")
        if val_ds is not None and (done == n_steps or
                                   (args.eval_every and done % args.eval_every == 0)):
            record.update(evaluate(raw_model, reference, ref_tables.get("val"), val_ds,
                                   functools.partial(loss_fn, **variants.loss_options()),
                                   args, ctx, dist_info))
            log(f"step {done}: train loss {record['loss']:.4f}, val loss "
                f"{record['val/loss']:.4f}, val reward accuracy "
                f"{record['val/rewards/accuracies']:.3f}, margin "
                f"{record['val/rewards/margins']:.3f}")
        if done % args.log_every == 0 or done == end_step or "val/loss" in record:
            metrics_log.write(record)
        if is_main and not args.no_save and (done == end_step or
                                             (args.save_every and done % args.save_every == 0)):
            state = training.train_state(optimizer, scaler, done, args, run, device)
            state["dpo"] = variants.state_dict()
            save_checkpoint(ckpt_path, raw_model, tokenizer_id, state)

    # ------------------------------------------------------------------------
    # 7. Save (done above at the last step) and show a few answers
    elapsed = time.time() - t0
    log(f"done: {end_step - start_step} steps in {elapsed:.1f}s, {skipped_steps} skipped; "
        f"{pairs_seen / max(elapsed, 1e-9):.2f} pairs/s, {tokens_seen / max(elapsed, 1e-9):.0f} "
        f"tokens/s" + devices.peak_gpu_memory(device)
        + ("" if args.no_save else f"; saved {ckpt_path}"))
    if is_main and args.samples:
        show_samples(raw_model, enc, args.samples, device, args.data, args.val_data, pairs=True)


def evaluate(model, reference, ref_table, dataset, loss_fn, args, ctx, dist_info):
    """DPO: loss and reward metrics over a held-out set of pairs, split over ranks. Runs on
    the unwrapped model: a DDP forward on one rank only would wait for the others."""
    model.eval()
    totals = [0.0] * (len(METRIC_NAMES) + 1)  # summed metrics, pairs
    with torch.no_grad():
        for idx in training.eval_batches(len(dataset), args.batch_size, dist_info):
            batch = pair_batch(dataset, idx, args, dist_info.device)
            with ctx:
                logps, n_tokens = pair_logps(model, batch, args)
                ref = reference_logps(reference, ref_table, idx, batch, args, dist_info.device)
            pair_losses, chosen_rewards, rejected_rewards = loss_fn(
                logps.chosen, logps.rejected, ref.chosen, ref.rejected,
                chosen_n_tokens=n_tokens.chosen, rejected_n_tokens=n_tokens.rejected)
            nll = (-logps.chosen / n_tokens.chosen).mean()
            metrics = preference_metrics(pair_losses, chosen_rewards, rejected_rewards, logps)
            metrics.update({"loss": pair_losses.mean() + args.sft_alpha * nll + model.aux_loss,
                            "loss/nll": nll, "loss/aux": model.aux_loss})
            for j, name in enumerate(METRIC_NAMES):
                totals[j] += metrics[name].item() * len(idx)
            totals[-1] += len(idx)
    model.train()
    totals = training.all_reduce_sum(totals, dist_info.world_size, dist_info.device)
    return {f"val/{name}": totals[j] / totals[-1] for j, name in enumerate(METRIC_NAMES)}

# ----------------------------------------------------------------------------
# DPO: the pairs' batches and their log-probs (the policy and reference: training.py)


def pair_batch(dataset, idx, args, device):
    """The pairs idx as one batch on device: (ids, mask) of data.collate_pairs, each
    (2B, T), rows 0..B-1 chosen and B..2B-1 rejected."""
    items = [dataset[i] for i in idx]
    if args.packed:  # another batch layout: each prompt once, no padding (extras/packed.py)
        return packed.pack_pairs(items).to(device)
    ids, mask = data.collate_pairs(items, dataset.pad_id)
    return data.to_device(ids, device), data.to_device(mask, device)


def pair_logps(model, batch, args):
    """(logps, n_tokens) of a pair_batch, each a ChosenRejected of (B,) tensors."""
    if args.packed:
        return packed.packed_logps(model, batch, args.chunked_head)
    ids, mask = batch
    return concatenated_logps(model, ids, mask, args.chunked_head)


def reference_logps(reference, ref_table, idx, batch, args, device):
    """The reference's summed log-probs of a batch, as ChosenRejected: a no-grad forward
    of the reference, 0 with --reference-free (and for the losses that never read them),
    or with --precompute-ref looked up in its table."""
    if ref_table is not None:
        rows = ref_table[idx].to(device)  # (B, 2)
        return ChosenRejected(chosen=rows[:, 0], rejected=rows[:, 1])
    if reference is None:  # --reference-free: log pi_ref(y|x) taken as 0
        zeros = torch.zeros(len(idx), device=device)
        return ChosenRejected(chosen=zeros, rejected=zeros)
    with torch.no_grad():
        return pair_logps(reference, batch, args)[0]


if __name__ == "__main__":
    training.run(main)
