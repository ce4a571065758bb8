"""Stage 2: Direct Preference Optimization (DPO) of the SFT model on preference pairs.

The loss is the paper's Eq. 7 (loss.dpo_loss) on each pair's summed response log-probs
under the policy and under a frozen copy of the SFT model, the reference. The result,
out/dpo.pt, is the aligned model.
The two scripts have the same numbered sections: `diff train_sft.py train_dpo.py`
shows what DPO adds.

Run:  python train_sft.py && torchrun --standalone --nproc_per_node=2 train_dpo.py
      python train_dpo.py --data my_pairs.jsonl --beta 0.1 --loss sigmoid
"""

import copy
import functools
import math
import os
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

import checkpoint
import data
import devices
import errors
import flags
import tokenizer
import train_sft
import training
from extras import losses, precomputed_reference, variant_state
from loss import (METRIC_NAMES, REFERENCE_FREE_LOSSES, dpo_loss, dpo_objective, pair_logps,
                  read_step, reference_logps)
from sample import show_samples

STAGE = "dpo"


# ----------------------------------------------------------------------------
# 1. Arguments: every flag, its default and its help text are in flags.py

def parse_args(argv=None):
    return flags.parse_dpo_args(argv, __doc__.split("\n\n")[0])


def main(argv=None):
    args = parse_args(argv)

    # ------------------------------------------------------------------------
    # 2. Distributed set-up: one process per device under torchrun, else a single process
    dist_info = training.setup_distributed(args.device)
    device, is_main = dist_info.device, dist_info.is_main
    log = print if is_main else (lambda *a, **k: None)
    # DPO: beta, and the SFT model it starts from (--sft-ckpt; by default OUT_DIR/sft.pt,
    # trained first when missing: train_sft.py's own main, under the same launcher)
    log(f"beta {args.beta} ({args.beta_source})")
    if args.sft_first:
        train_sft.main(flags.sft_stage_argv(args, log))
        if dist_info.world_size > 1:
            torch.distributed.barrier()  # every rank waits for rank 0's sft.pt
    training.seed_everything(args.seed)
    ctx = training.autocast(device, args.dtype)
    devices.announce_dtype(device, args, log)
    devices.reset_peak_gpu_memory(device)  # this stage's peak, not an earlier one's
    ckpt_path = os.path.join(args.out_dir, f"{STAGE}.pt")

    # ------------------------------------------------------------------------
    # 3. Data
    enc = tokenizer.load_tokenizer(args.tokenizer)
    tokenizer_id = tokenizer.tokenizer_identity(args.tokenizer)
    train_ds = data.PreferenceDataset(args.data, enc, args.max_len, args.max_prompt_len,
                                      args.skip_invalid, log)
    val_ds = (data.PreferenceDataset(args.val_data, enc, args.max_len, args.max_prompt_len,
                                     args.skip_invalid, log) if args.val_data else None)
    train_lengths = train_ds.lengths()
    order = data.BatchOrder(train_lengths, args.batch_size, args.seed, dist_info.rank,
                            dist_info.world_size, args.grad_accum, args.group_by_length)
    n_steps = flags.total_steps(args, order.steps_per_epoch, len(train_ds))
    log(f"{len(train_ds)} training pairs ({sum(train_lengths) / len(train_ds):.1f} tokens a "
        f"pair), {order.steps_per_epoch} steps per epoch, {n_steps} steps")

    # ------------------------------------------------------------------------
    # 4. Model (and, with --resume, the weights of the last checkpoint)
    # DPO: the policy starts from the SFT weights. The reference is a copy of them (or the
    # --ref-ckpt model), frozen: eval(), no gradients, and never wrapped in DDP. Copied here,
    # before --resume loads the last checkpoint into the policy, it is the SFT model still.
    model = checkpoint.dpo_model(args.sft_ckpt, tokenizer_id,
                                 flags.config_from_args(args, enc.n_vocab))
    model.to(device)
    reference = None  # --reference-free, and the losses that never read one
    if not args.reference_free and args.loss not in REFERENCE_FREE_LOSSES:
        reference = (checkpoint.dpo_model(args.ref_ckpt, tokenizer_id, model.config, True)
                     if args.ref_ckpt else copy.deepcopy(model))
        reference.to(device).eval().requires_grad_(False)
    # --resume: the weights here, optimizer, scaler, RNG and step in section 5; exact, as
    # step k's batches depend on k, the data and run_identity's flags only (data.BatchOrder)
    run = checkpoint.run_identity(args, flags.RUN_KEYS[STAGE], model.config)
    resume = checkpoint.load_resume(ckpt_path, args.resume, model, tokenizer_id, run, log)
    flags.check_max_len(args.max_len, model.config)
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
    # float16's GradScaler, off for bfloat16 and float32 (their range needs none)
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "float16")
    start_step = checkpoint.restore_training_state(resume, optimizer, scaler, device)
    metrics_log = checkpoint.MetricsLog(os.path.join(args.out_dir, STAGE, "metrics.jsonl"),
                                        is_main, resume is not None, args)
    # DPO: the loss with its hyper-parameters, fixed once for the whole run, and what some
    # variants carry from step to step (extras/variant_state.py; in checkpoints too)
    loss_fn = functools.partial(dpo_loss, beta=args.beta, loss_type=args.loss,
                                label_smoothing=args.label_smoothing, **losses.options(args))
    variants = variant_state.VariantState(args, reference, resume)

    # ------------------------------------------------------------------------
    # 6. Training loop
    end_step = flags.last_step(args, start_step, n_steps)
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
            batch = data.pair_batch(train_ds, idx, device, args.packed)  # 2B rows
            with sync:
                with ctx:
                    # the reference first: its activations are freed before the policy's,
                    # kept for the backward, pile up (~50 MB less peak at MiniMind's shape)
                    ref = reference_logps(reference, ref_tables.get("train"), idx, batch, device,
                                          args.packed, args.chunked_head)
                    logps, n_tokens = pair_logps(model, batch, args.packed, args.chunked_head)
                # DPO: Eq. 7 per pair (loss_fn), their mean, + RPO's NLL term (--sft-alpha)
                # and the MoE routers' load balancing (0 if dense): loss.dpo_objective
                loss, metrics = dpo_objective(loss_fn, logps, n_tokens, ref, args.sft_alpha,
                                              raw_model.aux_loss, **variants.loss_options())
                scaler.scale(loss / len(micro)).backward()
            for name, v in metrics.items():
                step_metrics[name] = step_metrics.get(name, 0.0) + v / len(micro)
            pairs_seen += len(idx) * dist_info.world_size
            tokens_seen += sum(train_lengths[i] for i in idx) * dist_info.world_size
        # The AMP step: unscale (a no-op unless float16's GradScaler is on), clip, step. A
        # step with non-finite gradients is skipped, never applied (float16: the scaler
        # skips it and lowers its scale); the lr schedule and the data order still advance.
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(),
                                                   args.grad_clip or math.inf)  # 0-dim
        # the metrics averaged over ranks and the norm, in the step's one host sync
        record, grad_norm = read_step(step_metrics, METRIC_NAMES, grad_norm,
                                      dist_info.world_size)
        if not math.isfinite(record["loss"]) and args.dtype != "float16":  # fp16: scaler skips
            raise errors.NonFiniteLoss(record["loss"], step, args.dtype)
        skipped = not math.isfinite(grad_norm)
        if scaler.is_enabled() or not skipped:
            scaler.step(optimizer)  # = optimizer.step() when the scaler is off
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        skipped_steps += skipped
        done = step + 1
        variants.after_step(done, record, skipped, raw_model)  # BCO's delta, TR-DPO's sync
        elapsed = time.time() - t0
        record.update(step=done, grad_norm=grad_norm, lr=lr, skipped_steps=skipped_steps,
                      tokens_per_s=tokens_seen / elapsed,
                      pairs_per_s=pairs_seen / elapsed,
                      **devices.gpu_memory(device))  # peak MiB so far, on a GPU
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
            state = checkpoint.train_state(optimizer, scaler, done, args, run, device,
                                          dist_info.world_size)
            state["dpo"] = variants.state_dict()
            checkpoint.save_checkpoint(ckpt_path, raw_model, tokenizer_id, state)

    # ------------------------------------------------------------------------
    # 7. Save (done above at the last step) and show a few answers
    elapsed = time.time() - t0
    log(f"done: {end_step - start_step} steps in {elapsed:.1f}s, {skipped_steps} skipped; "
        f"{pairs_seen / max(elapsed, 1e-9):.2f} pairs/s, "
        f"{tokens_seen / max(elapsed, 1e-9):.0f} tokens/s"
        + devices.peak_gpu_memory(device)
        + ("" if args.no_save else f"; saved {ckpt_path}"))
    if is_main and args.samples:
        show_samples(raw_model, enc, args.samples, device, args.data, args.val_data, pairs=True)


def evaluate(model, reference, ref_table, dataset, loss_fn, args, ctx, dist_info):
    """DPO: loss and reward metrics over a held-out set of pairs, split over ranks.
    Runs on the unwrapped model: a DDP forward on one rank only would wait for the others."""
    model.eval()
    totals = [0.0] * (len(METRIC_NAMES) + 1)  # summed metrics, pairs
    with torch.no_grad():
        for idx in training.eval_batches(len(dataset), args.batch_size, dist_info):
            batch = data.pair_batch(dataset, idx, dist_info.device, args.packed)
            with ctx:
                logps, n_tokens = pair_logps(model, batch, args.packed, args.chunked_head)
                ref = reference_logps(reference, ref_table, idx, batch, dist_info.device,
                                      args.packed, args.chunked_head)
            _, metrics = dpo_objective(loss_fn, logps, n_tokens, ref, args.sft_alpha,
                                       model.aux_loss)
            for j, name in enumerate(METRIC_NAMES):
                totals[j] += metrics[name].item() * len(idx)
            totals[-1] += len(idx)
    model.train()
    totals = training.all_reduce_sum(totals, dist_info.world_size, dist_info.device)
    return {f"val/{name}": totals[j] / totals[-1] for j, name in enumerate(METRIC_NAMES)}


if __name__ == "__main__":
    errors.run(main)
