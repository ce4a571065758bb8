"""Stage 1: supervised fine-tuning (SFT) of a small Transformer on chat data.

The loss is the token-mean cross-entropy over assistant tokens only (the chat
template's loss mask). The result, out/sft.pt, is where DPO starts.
The two scripts have the same numbered sections: `diff train_sft.py train_dpo.py`
shows what DPO adds.

Run:  python train_sft.py                              (TinyChat, tiny preset, ~4 min on 2 cores)
      torchrun --standalone --nproc_per_node=2 train_sft.py
      python train_sft.py --data my_sft.jsonl --val-data my_val.jsonl --tokenizer my.tiktoken
"""

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
import training
from loss import read_step, response_logps
from model import Transformer
from sample import show_samples

STAGE = "sft"
METRIC_NAMES = ("loss", "loss/aux")  # loss/aux: MoE load balancing (0 if dense)


# ----------------------------------------------------------------------------
# 1. Arguments: every flag, its default and its help text are in flags.py

def parse_args(argv=None):
    return flags.parse_sft_args(argv, __doc__.split("\n\n")[0])


def main(argv=None):
    args = parse_args(argv)

    # ------------------------------------------------------------------------
    # 2. Distributed set-up: one process per device under torchrun, else a single process
    dist_info = training.setup_distributed(args.device)
    device, is_main = dist_info.device, dist_info.is_main
    log = print if is_main else (lambda *a, **k: None)
    training.seed_everything(args.seed)
    ctx = training.autocast(device, args.dtype)
    devices.announce_dtype(device, args, log)
    devices.reset_peak_gpu_memory(device)  # this stage's peak, not an earlier one's
    ckpt_path = os.path.join(args.out_dir, f"{STAGE}.pt")

    # ------------------------------------------------------------------------
    # 3. Data
    enc = tokenizer.load_tokenizer(args.tokenizer)
    tokenizer_id = tokenizer.tokenizer_identity(args.tokenizer)
    train_ds = data.SFTDataset(args.data, enc, args.max_len, args.skip_invalid, log)
    val_ds = (data.SFTDataset(args.val_data, enc, args.max_len, args.skip_invalid, log)
              if args.val_data else None)
    train_lengths = train_ds.lengths()
    order = data.BatchOrder(train_lengths, args.batch_size, args.seed, dist_info.rank,
                            dist_info.world_size, args.grad_accum, args.group_by_length)
    # every rank's examples of a step (the same global batch, as one rank would take it):
    # the token count of the whole step is known here, with no collective
    every_rank = data.BatchOrder(train_lengths, args.batch_size, args.seed, 0, 1, 1,
                                 args.group_by_length)
    targets = [sum(mask[1:]) for _, mask in train_ds.items]  # assistant tokens predicted
    n_steps = flags.total_steps(args, order.steps_per_epoch, len(train_ds))
    log(f"{len(train_ds)} training conversations ({train_ds.truncated} cut to --max-len "
        f"{args.max_len}), {order.steps_per_epoch} steps per epoch, {n_steps} steps")

    # ------------------------------------------------------------------------
    # 4. Model (and, with --resume, the weights of the last checkpoint)
    model = Transformer(flags.config_from_args(args, enc.n_vocab))
    model.to(device)
    # --resume: the weights here, optimizer, scaler, RNG and step in section 5; exact, as
    # step k's batches depend on k, the data and run_identity's flags only (data.BatchOrder)
    run = checkpoint.run_identity(args, flags.RUN_KEYS[STAGE], model.config)
    resume = checkpoint.load_resume(ckpt_path, args.resume, model, tokenizer_id, run, log)
    flags.check_max_len(args.max_len, model.config)
    log(f"model: {model.num_params():,} parameters, {model.config}")
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

    # ------------------------------------------------------------------------
    # 6. Training loop
    end_step = flags.last_step(args, start_step, n_steps)
    skipped_steps, tokens_seen, t0 = 0, 0, time.time()
    bar = tqdm(range(start_step, end_step), initial=start_step, total=n_steps,
               disable=not is_main or args.quiet, desc=STAGE)
    for step in bar:
        lr = training.lr_at(step, n_steps, args.lr, args.warmup_steps, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = order(step)  # grad_accum lists of example indices
        # Token-mean over the whole global batch: divide by the count on all ranks and
        # all micro-batches (DDP then averages the gradients over ranks, hence * world).
        global_targets = sum(targets[i] for idx in every_rank(step) for i in idx)
        step_metrics = {"loss": 0.0, "loss/aux": 0.0}
        for k, idx in enumerate(micro):
            last = k == len(micro) - 1
            sync = nullcontext() if last or dist_info.world_size == 1 else model.no_sync()
            ids, mask = data.collate_sft([train_ds[i] for i in idx], train_ds.pad_id)
            ids = devices.to_device(ids, device)  # the mask stays on the host: response_logps
            with sync:
                with ctx:
                    logps, n_tokens = response_logps(model, ids, mask, args.chunked_head)
                loss = -logps.sum() * dist_info.world_size / global_targets
                aux = raw_model.aux_loss / len(micro)  # MoE: the routers' load balancing
                loss = loss + aux
                scaler.scale(loss).backward()
            step_metrics["loss"] += loss.detach()
            step_metrics["loss/aux"] += aux.detach()
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
        elapsed = time.time() - t0
        record.update(step=done, grad_norm=grad_norm, lr=lr, skipped_steps=skipped_steps,
                      tokens_per_s=tokens_seen / elapsed,
                      **devices.gpu_memory(device))  # peak MiB so far, on a GPU
        if is_main:
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.1e}")
        if val_ds is not None and (done == n_steps or
                                   (args.eval_every and done % args.eval_every == 0)):
            record.update(evaluate(raw_model, val_ds, args, ctx, dist_info))
            log(f"step {done}: train loss {record['loss']:.4f}, val loss "
                f"{record['val/loss']:.4f}")
        if done % args.log_every == 0 or done == end_step or "val/loss" in record:
            metrics_log.write(record)
        if is_main and not args.no_save and (done == end_step or
                                             (args.save_every and done % args.save_every == 0)):
            state = checkpoint.train_state(optimizer, scaler, done, args, run, device,
                                          dist_info.world_size)
            checkpoint.save_checkpoint(ckpt_path, raw_model, tokenizer_id, state)

    # ------------------------------------------------------------------------
    # 7. Save (done above at the last step) and show a few answers
    elapsed = time.time() - t0
    log(f"done: {end_step - start_step} steps in {elapsed:.1f}s, {skipped_steps} skipped; "
        f"{tokens_seen / max(elapsed, 1e-9):.0f} tokens/s"
        + devices.peak_gpu_memory(device)
        + ("" if args.no_save else f"; saved {ckpt_path}"))
    if is_main and args.samples:
        show_samples(raw_model, enc, args.samples, device, args.data, args.val_data)


def evaluate(model, dataset, args, ctx, dist_info):
    """The token-mean cross-entropy over a held-out set, split over ranks.
    Runs on the unwrapped model: a DDP forward on one rank only would wait for the others."""
    model.eval()
    totals = [0.0, 0.0]  # summed NLL, tokens
    with torch.no_grad():
        for idx in training.eval_batches(len(dataset), args.batch_size, dist_info):
            ids, mask = data.collate_sft([dataset[i] for i in idx], dataset.pad_id)
            ids = devices.to_device(ids, dist_info.device)  # the mask stays on the host
            with ctx:
                logps, n_tokens = response_logps(model, ids, mask, args.chunked_head)
            totals[0] -= logps.sum().item()
            totals[1] += n_tokens.sum().item()
    model.train()
    nll, count = training.all_reduce_sum(totals, dist_info.world_size, dist_info.device)
    return {"val/loss": nll / max(count, 1)}


if __name__ == "__main__":
    errors.run(main)
