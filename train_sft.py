"""Stage 1: supervised fine-tuning (SFT) of a small Transformer on chat data.

The loss is the token-mean cross-entropy over assistant tokens only (the chat
template's loss mask). The result, out/sft.pt, is where DPO starts.

Run:  python train_sft.py                              (TinyChat, tiny preset, ~4 min on 2 cores)
      torchrun --standalone --nproc_per_node=2 train_sft.py
      python train_sft.py --data my_sft.jsonl --val-data my_val.jsonl --tokenizer my.tiktoken
"""

import argparse
import functools
import os
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

import data
import training
from loss import sequence_logps
from model import (Transformer, add_model_args, config_from_args, configure_optimizer,
                   save_checkpoint)
from sample import show_samples

STAGE = "sft"


# ----------------------------------------------------------------------------
# 1. Arguments

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default=os.path.join(data.DATA_DIR, "sft_train.jsonl"),
                        help="SFT training file (.jsonl or .json, any supported format)")
    parser.add_argument("--val-data", default=os.path.join(data.DATA_DIR, "sft_val.jsonl"),
                        help="SFT validation file ('' for none)")
    parser.add_argument("--tokenizer", default=data.DEFAULT_TOKENIZER,
                        help=".tiktoken file (train one with python data.py)")
    parser.add_argument("--samples", type=int, default=6,
                        help="greedy answers to held-out TinyChat prompts printed at the end")
    add_model_args(parser)
    training.add_training_args(parser, dict(out_dir="out", epochs=2.0, batch_size=32,
                                            lr=2e-3, warmup_steps=50, max_len=256,
                                            eval_every=200))
    return parser.parse_args(argv)


def validation_loss(model, dataset, batch_size, ctx, dist_info):
    """Token-mean cross-entropy over a whole data set, split over ranks."""
    model.eval()
    nll, count = 0.0, 0.0
    with torch.no_grad():
        for start in range(dist_info.rank * batch_size, len(dataset),
                           batch_size * dist_info.world_size):
            batch = data.collate_sft(dataset.items[start:start + batch_size], dataset.pad_id)
            ids = batch["input_ids"].to(dist_info.device)
            with ctx:
                logits = model(ids)  # (B, T, V)
            logps, n = sequence_logps(logits, ids, batch["loss_mask"].to(dist_info.device))
            nll -= logps.sum().item()
            count += n.sum().item()
    model.train()
    nll, count = training.all_reduce_sum([nll, count], dist_info.world_size, dist_info.device)
    return nll / max(count, 1)


def main(argv=None):
    args = parse_args(argv)

    # ------------------------------------------------------------------------
    # 2. Distributed set-up: one process per device under torchrun, else a single process
    dist_info = training.setup_distributed(args.device)
    device, is_main = dist_info.device, dist_info.is_main
    log = print if is_main else (lambda *a, **k: None)
    training.seed_everything(args.seed)
    ctx = training.autocast(device, args.dtype)
    ckpt_path = os.path.join(args.out_dir, f"{STAGE}.pt")

    # ------------------------------------------------------------------------
    # 3. Data
    enc = data.load_tokenizer(args.tokenizer)
    tokenizer_id = data.tokenizer_identity(args.tokenizer)
    train_ds = data.SFTDataset(args.data, enc, args.max_len, args.skip_invalid, log)
    val_ds = (data.SFTDataset(args.val_data, enc, args.max_len, args.skip_invalid, log)
              if args.val_data else None)
    epoch_batches = functools.lru_cache(maxsize=2)(functools.partial(
        data.epoch_batches, train_ds.lengths(), args.batch_size, args.seed,
        rank=dist_info.rank, world_size=dist_info.world_size, grad_accum=args.grad_accum,
        group_by_length=args.group_by_length))
    batches_per_epoch = len(epoch_batches(0))
    if batches_per_epoch == 0:
        raise SystemExit(f"{args.data}: {len(train_ds)} conversations are fewer than one "
                         f"global batch ({args.batch_size} x {dist_info.world_size})")
    n_steps = training.total_steps(args, batches_per_epoch)
    log(f"{len(train_ds)} training conversations ({train_ds.truncated} cut to --max-len "
        f"{args.max_len}), {batches_per_epoch} batches per epoch, {n_steps} steps")

    # ------------------------------------------------------------------------
    # 4. Model (and the training state when resuming)
    config = config_from_args(args, enc.n_vocab)
    model = Transformer(config)
    resume = training.load_resume(ckpt_path, args.resume, model, tokenizer_id)
    model.to(device)
    log(f"model: {model.num_params():,} parameters, {config}")
    raw_model = model  # the unwrapped model: what we save
    model = training.wrap_model(model, args.compile, dist_info)  # compile, DDP

    # ------------------------------------------------------------------------
    # 5. Optimizer, learning-rate schedule, AMP scaler
    optimizer = configure_optimizer(raw_model, args.lr, args.weight_decay,
                                    device_type=device.type)
    scaler = training.make_scaler(device, args.dtype)
    start_step = training.restore_training_state(resume, optimizer, scaler)
    if resume is not None:
        log(f"resumed from {ckpt_path} at step {start_step}")
    metrics = training.MetricsLog(os.path.join(args.out_dir, STAGE, "metrics.jsonl"),
                                  is_main, resume is not None)

    # ------------------------------------------------------------------------
    # 6. Training loop
    end_step = training.last_step(args, start_step, n_steps)
    skipped_steps, tokens_seen, t0 = 0, 0, time.time()
    bar = tqdm(range(start_step, end_step), initial=start_step, total=n_steps,
               disable=not is_main or args.quiet, desc=STAGE)
    for step in bar:
        lr = training.lr_at(step, n_steps, args.lr, args.warmup_steps, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = training.micro_batches(epoch_batches, step, args.grad_accum, batches_per_epoch)
        batches = [data.collate_sft([train_ds[i] for i in idx], train_ds.pad_id)
                   for _, idx in micro]
        # Token-mean over the whole global batch: divide by the count on all ranks and
        # all micro-batches (DDP then averages the gradients over ranks, hence * world).
        local_targets = sum(b["loss_mask"][:, 1:].sum().item() for b in batches)
        local_tokens = sum(len(train_ds[i][0]) for _, idx in micro for i in idx)
        global_targets, global_tokens = training.all_reduce_sum(
            [local_targets, local_tokens], dist_info.world_size, device)
        train_loss = torch.zeros((), device=device)
        for k, batch in enumerate(batches):
            last = k == len(batches) - 1
            sync = nullcontext() if last or dist_info.world_size == 1 else model.no_sync()
            with sync:
                ids = batch["input_ids"].to(device)  # (B, T)
                with ctx:
                    logits = model(ids)  # (B, T, V)
                logps, _ = sequence_logps(logits, ids, batch["loss_mask"].to(device))
                loss = -logps.sum() * dist_info.world_size / global_targets
                scaler.scale(loss).backward()
            train_loss += loss.detach() / dist_info.world_size
        grad_norm, skipped = training.optimizer_step(raw_model, optimizer, scaler,
                                                     args.grad_clip)
        skipped_steps += skipped
        tokens_seen += global_tokens
        loss_value = training.all_reduce_sum([train_loss.item()], dist_info.world_size,
                                             device)[0]
        training.check_finite_loss(loss_value, step, args.dtype)
        done = step + 1
        if is_main:
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}")
        record = {"step": done, "loss": loss_value, "grad_norm": grad_norm, "lr": lr,
                  "skipped_steps": skipped_steps,
                  "tokens_per_s": tokens_seen / (time.time() - t0)}
        if val_ds is not None and (done == n_steps or
                                   (args.eval_every and done % args.eval_every == 0)):
            record["val/loss"] = validation_loss(model, val_ds, args.batch_size, ctx, dist_info)
            log(f"step {done}: train loss {loss_value:.4f}, val loss {record['val/loss']:.4f}")
        if done % args.log_every == 0 or done == end_step or "val/loss" in record:
            metrics.write(record)
        if is_main and not args.no_save and (done == end_step or
                                             (args.save_every and done % args.save_every == 0)):
            save_checkpoint(ckpt_path, raw_model, tokenizer_id,
                            training.train_state(optimizer, scaler, done, args))

    # ------------------------------------------------------------------------
    # 7. Save (done above at the last step) and show a few answers
    elapsed = time.time() - t0
    log(f"done: {end_step - start_step} steps in {elapsed:.0f}s, {skipped_steps} skipped, "
        f"{tokens_seen / max(elapsed, 1e-9):.0f} tokens/s" +
        ("" if args.no_save else f"; saved {ckpt_path}"))
    if is_main and args.samples:
        show_samples(raw_model, enc, args.samples, device)
    training.cleanup_distributed()


if __name__ == "__main__":
    try:
        main()
    except training.NonFiniteLoss as e:
        raise SystemExit(f"error: {e}") from None
