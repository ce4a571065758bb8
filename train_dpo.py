"""Stage 2: Direct Preference Optimization (DPO) of the SFT model on preference pairs.

The whole DPO loop is in this file. Per step: one forward of chosen and rejected
together through the policy, the same through the frozen reference (or a lookup
with --precompute-ref), the DPO loss of loss.py, backward, clip, AdamW.
Sections are numbered as in train_sft.py; what DPO adds is marked "DPO:".

Run:  python train_sft.py && torchrun --standalone --nproc_per_node=2 train_dpo.py
      python train_dpo.py --data my_pairs.jsonl --beta 0.1 --loss sigmoid
"""

import argparse
import copy
import functools
import hashlib
import os
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

import data
import training
from loss import (LOSS_TYPES, METRIC_NAMES, concatenated_logps, dpo_loss, preference_metrics,
                  split_pairs)
from model import (Transformer, add_model_args, check_tokenizer, config_from_args,
                   configure_optimizer, load_checkpoint, model_from_checkpoint,
                   save_checkpoint)
from sample import show_samples

STAGE = "dpo"


# ----------------------------------------------------------------------------
# 1. Arguments

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sft-ckpt", default="out/sft.pt",
                        help="SFT checkpoint: the policy's start and the reference ('' = a "
                        "fresh model shaped by --preset/--dim/..., for timing runs)")
    parser.add_argument("--data", default=os.path.join(data.DATA_DIR, "pairs_train.jsonl"),
                        help="preference pairs (.jsonl or .json, any supported format)")
    parser.add_argument("--val-data", default=os.path.join(data.DATA_DIR, "pairs_val.jsonl"),
                        help="held-out pairs for --eval-every ('' for none)")
    parser.add_argument("--tokenizer", default=data.DEFAULT_TOKENIZER, help=".tiktoken file")
    parser.add_argument("--beta", type=float, default=0.1,
                        help="DPO beta: strength of the KL penalty to the reference")
    parser.add_argument("--loss", default="sigmoid", choices=LOSS_TYPES,
                        help="sigmoid (DPO, Eq. 7), ipo or hinge")
    parser.add_argument("--label-smoothing", type=float, default=0.0,
                        help="conservative DPO: assumed share of flipped labels")
    parser.add_argument("--sft-alpha", type=float, default=1.0,
                        help="RPO: weight of the chosen answers' token-mean NLL; keeps the "
                        "chosen answers likely (and ending), see README (0 = plain DPO)")
    parser.add_argument("--reference-free", action="store_true",
                        help="no reference model (its log-ratio is taken as 0)")
    parser.add_argument("--max-prompt-len", type=int, default=128,
                        help="prompts are cut from the left to this many tokens")
    parser.add_argument("--precompute-ref", action="store_true",
                        help="compute the reference log-probs once, cache them on disk and "
                        "free the reference model: no reference forward per step")
    parser.add_argument("--samples", type=int, default=6,
                        help="greedy answers to held-out TinyChat prompts printed at the end")
    add_model_args(parser)
    training.add_training_args(parser, dict(out_dir="out", epochs=1.0, batch_size=8,
                                            lr=5e-5, warmup_steps=20, max_len=256,
                                            eval_every=100))
    return parser.parse_args(argv)


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def reference_logps_all(reference, dataset, batch_size, ctx, dist_info):
    """DPO: the reference's (chosen, rejected) log-probs of every pair, as an (N, 2) tensor.
    Pairs are batched in length order (little padding); each rank computes every
    world_size-th batch and one all-reduce shares the results."""
    out = torch.zeros(len(dataset), 2, dtype=torch.float64, device=dist_info.device)
    lengths = dataset.lengths()
    order = sorted(range(len(dataset)), key=lambda i: lengths[i])
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    with torch.no_grad():
        for idx in batches[dist_info.rank::dist_info.world_size]:
            batch = training.to_device(data.collate_pairs([dataset[i] for i in idx],
                                                          dataset.pad_id), dist_info.device)
            with ctx:
                logps, _ = concatenated_logps(reference, batch)
            out[idx, 0], out[idx, 1] = logps.chosen.double(), logps.rejected.double()
    if dist_info.world_size > 1:
        torch.distributed.all_reduce(out)
    return out.float().cpu()


def evaluate_pairs(model, reference, ref_table, dataset, args, ctx, dist_info):
    """DPO: loss and reward metrics on held-out pairs, averaged over all of them."""
    model.eval()
    sums, count = {}, 0
    with torch.no_grad():
        starts = list(range(0, len(dataset), args.batch_size))
        for start in starts[dist_info.rank::dist_info.world_size]:
            idx = list(range(start, min(start + args.batch_size, len(dataset))))
            batch = training.to_device(data.collate_pairs([dataset[i] for i in idx],
                                                          dataset.pad_id), dist_info.device)
            with ctx:
                logps, n_tokens = concatenated_logps(model, batch)
                ref = reference_for(reference, ref_table, idx, batch, dist_info.device)
            metrics = preference_metrics(*dpo_step_loss(logps, n_tokens, ref, args), *logps)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v.item() * len(idx)
            count += len(idx)
    model.train()
    totals = training.all_reduce_sum([sums.get(k, 0.0) for k in METRIC_NAMES] + [count],
                                     dist_info.world_size, dist_info.device)
    return {f"eval/{k}": v / totals[-1] for k, v in zip(METRIC_NAMES, totals[:-1])}


def reference_for(reference, ref_table, idx, batch, device):
    """DPO: the reference log-probs of a batch, as ChosenRejected: looked up in the
    precomputed table, or from a no-grad forward of the frozen reference model."""
    if ref_table is not None:
        rows = ref_table[idx].to(device)  # (B, 2)
        return split_pairs(torch.cat([rows[:, 0], rows[:, 1]]), len(idx))
    with torch.no_grad():
        return concatenated_logps(reference, batch)[0]


def dpo_step_loss(logps, n_tokens, ref, args):
    """DPO: per-pair losses and rewards from the policy's and the reference's log-probs."""
    return dpo_loss(logps.chosen, logps.rejected, ref.chosen, ref.rejected,
                    beta=args.beta, loss_type=args.loss, label_smoothing=args.label_smoothing,
                    reference_free=args.reference_free, chosen_n_tokens=n_tokens.chosen,
                    rejected_n_tokens=n_tokens.rejected, sft_alpha=args.sft_alpha)


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
    train_ds = data.PreferenceDataset(args.data, enc, args.max_len, args.max_prompt_len,
                                      args.skip_invalid, log)
    val_ds = (data.PreferenceDataset(args.val_data, enc, args.max_len, args.max_prompt_len,
                                     args.skip_invalid, log) if args.val_data else None)
    train_lengths = train_ds.lengths()  # tokens a pair costs
    epoch_batches = functools.lru_cache(maxsize=2)(functools.partial(
        data.epoch_batches, train_lengths, args.batch_size, args.seed,
        rank=dist_info.rank, world_size=dist_info.world_size, grad_accum=args.grad_accum,
        group_by_length=args.group_by_length))
    batches_per_epoch = len(epoch_batches(0))
    if batches_per_epoch == 0:
        raise SystemExit(f"{args.data}: {len(train_ds)} pairs are fewer than one global "
                         f"batch ({args.batch_size} x {dist_info.world_size})")
    n_steps = training.total_steps(args, batches_per_epoch)
    tokens_per_pair = sum(train_lengths) / len(train_ds)
    log(f"{len(train_ds)} training pairs ({tokens_per_pair:.1f} tokens a pair), "
        f"{batches_per_epoch} batches per epoch, {n_steps} steps")

    # ------------------------------------------------------------------------
    # 4. Model: DPO: the policy starts from the SFT weights; the reference is a frozen copy
    if args.sft_ckpt:
        if not os.path.exists(args.sft_ckpt):
            raise SystemExit(f"no SFT checkpoint at {args.sft_ckpt}. Train one first:\n"
                             f"    python train_sft.py\n(or pass --sft-ckpt PATH)")
        sft = load_checkpoint(args.sft_ckpt)
        check_tokenizer(sft, tokenizer_id, args.sft_ckpt)
        sft["config"]["dropout"] = 0.0  # DPO: dropout off in policy and reference
        model = model_from_checkpoint(sft, args.sft_ckpt)
        ckpt_key = file_digest(args.sft_ckpt)
    else:
        model = Transformer(config_from_args(args, enc.n_vocab))
        model.config.dropout = 0.0
        ckpt_key = f"random-init-seed{args.seed}-{model.config}"
    model.to(device)
    reference = None
    if not args.reference_free:
        reference = copy.deepcopy(model).eval().requires_grad_(False)  # never wrapped in DDP
    resume = training.load_resume(ckpt_path, args.resume, model, tokenizer_id)
    log(f"policy: {model.num_params():,} parameters, {model.config}")

    # DPO: --precompute-ref: every pair's reference log-probs once, cached on disk, and the
    # reference model freed.
    ref_table = val_ref_table = None
    if args.precompute_ref and reference is not None:
        key = hashlib.sha256("|".join([
            ckpt_key, file_digest(args.data), file_digest(args.val_data) if val_ds else "",
            tokenizer_id["sha256"], str(args.max_len), str(args.max_prompt_len),
            args.dtype, str(args.skip_invalid)]).encode()).hexdigest()[:16]
        cache_path = os.path.join(args.out_dir, STAGE, f"ref_logps_{key}.pt")
        if os.path.exists(cache_path):
            cached = torch.load(cache_path, weights_only=True)
            log(f"reference log-probs: loaded {cache_path}")
        else:
            t_ref = time.time()
            cached = {"train": reference_logps_all(reference, train_ds, 2 * args.batch_size,
                                                   ctx, dist_info)}
            if val_ds is not None:
                cached["val"] = reference_logps_all(reference, val_ds, 2 * args.batch_size,
                                                    ctx, dist_info)
            if is_main:
                os.makedirs(os.path.dirname(cache_path), exist_ok=True)
                torch.save(cached, cache_path + ".tmp")
                os.replace(cache_path + ".tmp", cache_path)
            log(f"reference log-probs: computed in {time.time() - t_ref:.1f}s, "
                f"cached in {cache_path}")
        ref_table, val_ref_table = cached["train"], cached.get("val")
        reference = None  # freed: no reference forward during training
    raw_model = model  # the unwrapped policy: what we save
    model = training.wrap_model(model, args.compile, dist_info)  # compile, DDP

    # ------------------------------------------------------------------------
    # 5. Optimizer, learning-rate schedule, AMP scaler
    optimizer = configure_optimizer(raw_model, args.lr, args.weight_decay,
                                    device_type=device.type)
    scaler = training.make_scaler(device, args.dtype)
    start_step = training.restore_training_state(resume, optimizer, scaler)
    if resume is not None:
        log(f"resumed from {ckpt_path} at step {start_step}")
    metrics_log = training.MetricsLog(os.path.join(args.out_dir, STAGE, "metrics.jsonl"),
                                      is_main, resume is not None)

    # ------------------------------------------------------------------------
    # 6. Training loop
    end_step = training.last_step(args, start_step, n_steps)
    skipped_steps, pairs_seen, tokens_seen, t0 = 0, 0, 0, time.time()
    record = {}
    bar = tqdm(range(start_step, end_step), initial=start_step, total=n_steps,
               disable=not is_main or args.quiet, desc=STAGE)
    for step in bar:
        lr = training.lr_at(step, n_steps, args.lr, args.warmup_steps, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_metrics = {}
        micro = training.micro_batches(epoch_batches, step, args.grad_accum, batches_per_epoch)
        for k, (_, idx) in enumerate(micro):
            last = k == len(micro) - 1
            sync = nullcontext() if last or dist_info.world_size == 1 else model.no_sync()
            batch = training.to_device(data.collate_pairs([train_ds[i] for i in idx],
                                                          train_ds.pad_id), device)  # (2B, T)
            with sync:
                with ctx:
                    logps, n_tokens = concatenated_logps(model, batch)  # policy, with grad
                    ref = reference_for(reference, ref_table, idx, batch, device)
                losses, chosen_rewards, rejected_rewards = dpo_step_loss(logps, n_tokens, ref,
                                                                         args)
                scaler.scale(losses.mean() / len(micro)).backward()
            for name, v in preference_metrics(losses, chosen_rewards, rejected_rewards,
                                              *logps).items():
                step_metrics[name] = step_metrics.get(name, 0.0) + v / len(micro)
            pairs_seen += len(idx) * dist_info.world_size
            tokens_seen += sum(train_lengths[i] for i in idx) * dist_info.world_size
        grad_norm, skipped = training.optimizer_step(raw_model, optimizer, scaler,
                                                     args.grad_clip)
        skipped_steps += skipped
        values = torch.stack([step_metrics[n] for n in METRIC_NAMES]).tolist()  # 1 host sync
        record = training.all_reduce_mean(dict(zip(METRIC_NAMES, values)),
                                          dist_info.world_size, device)
        training.check_finite_loss(record["loss"], step, args.dtype)
        done = step + 1
        elapsed = time.time() - t0
        record.update(step=done, grad_norm=grad_norm, lr=lr, skipped_steps=skipped_steps,
                      pairs_per_s=pairs_seen / elapsed, tokens_per_s=tokens_seen / elapsed)
        if is_main:
            bar.set_postfix(loss=f"{record['loss']:.3f}",
                            acc=f"{record['rewards/accuracies']:.2f}",
                            margin=f"{record['rewards/margins']:.2f}")
        if val_ds is not None and (done == n_steps or
                                   (args.eval_every and done % args.eval_every == 0)):
            record.update(evaluate_pairs(model, reference, val_ref_table, val_ds, args, ctx,
                                         dist_info))
            log(f"step {done}: loss {record['loss']:.4f}, held-out loss "
                f"{record['eval/loss']:.4f}, reward accuracy "
                f"{record['eval/rewards/accuracies']:.3f}, margin "
                f"{record['eval/rewards/margins']:.3f}")
        if done % args.log_every == 0 or done == end_step or "eval/loss" in record:
            metrics_log.write(record)
        if is_main and not args.no_save and (done == end_step or
                                             (args.save_every and done % args.save_every == 0)):
            save_checkpoint(ckpt_path, raw_model, tokenizer_id,
                            training.train_state(optimizer, scaler, done, args))

    # ------------------------------------------------------------------------
    # 7. Save (done above at the last step) and show a few answers
    elapsed = time.time() - t0
    log(f"done: {end_step - start_step} steps in {elapsed:.1f}s, {skipped_steps} skipped; "
        f"{pairs_seen / max(elapsed, 1e-9):.2f} pairs/s, {tokens_per_pair:.1f} tokens a pair"
        + ("" if args.no_save else f"; saved {ckpt_path}"))
    if is_main and args.samples:
        show_samples(raw_model, enc, args.samples, device)
    training.cleanup_distributed()


if __name__ == "__main__":
    try:
        main()
    except training.NonFiniteLoss as e:
        raise SystemExit(f"error: {e}") from None
