"""--precompute-ref: the reference's (chosen, rejected) log-probs of every pair computed
once, split over ranks, cached on disk under a key of everything they depend on, and
the reference model freed: no reference forward per step. train_dpo.py looks the
values up by pair index; the same numbers as the reference forward.
"""

import hashlib
import os
import time

import torch

import data
from checkpoint import file_digest, save_tensors
from loss import concatenated_logps


def precompute(reference, train_ds, val_ds, args, run, ctx, dist_info, log):
    """--precompute-ref: the reference's (chosen, rejected) log-probs of every training and
    held-out pair, {"train": (N, 2), "val": (M, 2)}, cached on disk under a key of
    everything they depend on (SFT weights, data files, tokenisation, dtype); the file
    hashes come from `run` (checkpoint.run_identity), which has them already."""
    key = reference_cache_key(args, run, reference.config, val_ds is not None,
                              dist_info.device.type)
    cache_path = os.path.join(args.out_dir, "dpo", f"ref_logps_{key}.pt")
    found = os.path.exists(cache_path)
    if dist_info.world_size > 1:  # every rank takes the same branch (out-dirs may be local)
        flag = torch.tensor([float(found)], device=dist_info.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        found = bool(flag.item())
    if found:
        log(f"reference log-probs: loaded {cache_path}")
        return torch.load(cache_path, weights_only=True)
    t0 = time.time()
    tables = {"train": reference_table(reference, train_ds, 2 * args.batch_size, ctx,
                                       dist_info)}
    if val_ds is not None:
        tables["val"] = reference_table(reference, val_ds, 2 * args.batch_size, ctx,
                                        dist_info)
    if dist_info.is_main:
        save_tensors(tables, cache_path)
    log(f"reference log-probs: computed in {time.time() - t0:.1f}s, cached in {cache_path}")
    return tables


def reference_cache_key(args, run, config, has_val, device_type):
    """16 hex digits of everything the reference's log-probs depend on: SFT weights (or the
    seed and shape of a fresh model), data files, tokenisation, dtype and the device type
    (CPU and GPU kernels round differently)."""
    return hashlib.sha256("|".join([
        (run.get("ref_ckpt_sha256") or run["sft_ckpt_sha256"]) if args.sft_ckpt
        else f"random-init-seed{args.seed}-{config}",
        run["data_sha256"], file_digest(args.val_data) if has_val else "",
        run["tokenizer_sha256"], str(args.max_len), str(args.max_prompt_len), args.dtype,
        str(args.skip_invalid), device_type]).encode()).hexdigest()[:16]


def reference_table(reference, dataset, batch_size, ctx, dist_info):
    """The reference's (chosen, rejected) log-probs of every pair of a data set, (N, 2).
    Pairs are batched in length order (little padding); each rank computes every
    world_size-th batch and one all-reduce shares the results."""
    out = torch.zeros(len(dataset), 2, dtype=torch.float64, device=dist_info.device)
    lengths = dataset.lengths()
    by_length = sorted(range(len(dataset)), key=lambda i: lengths[i])
    batches = [by_length[s:s + batch_size] for s in range(0, len(by_length), batch_size)]
    with torch.no_grad():
        for idx in batches[dist_info.rank::dist_info.world_size]:
            ids, mask = data.collate_pairs([dataset[i] for i in idx], dataset.pad_id)
            with ctx:
                logps, _ = concatenated_logps(reference, ids.to(dist_info.device), mask)
            out[idx, 0], out[idx, 1] = logps.chosen.double(), logps.rejected.double()
    if dist_info.world_size > 1:
        torch.distributed.all_reduce(out)
    return out.float().cpu()
