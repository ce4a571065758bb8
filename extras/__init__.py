"""minidpo's extras: everything beyond the core a learner reads, each in a file of its own,
each plugged into the core at one marked point.

    losses.py                 the DPO variants (robust, hinge, norm, DPOP, SimPO, R-DPO,
                              BCO-pair, NCA-pair, APO-zero, SPPO-hard, ORPO): loss.LOSSES
    variant_state.py          what a variant carries across steps: BCO's running shift,
                              TR-DPO's reference sync (train_dpo.py's one hook)
    precomputed_reference.py  --precompute-ref: the reference's log-probs once, cached
    packed.py                 --packed: each pair's prompt once, no padding (a batch layout)
    chunked_head.py           --chunked-head: log-probs without the (N, V) logits
    moe.py                    the mixture-of-experts feed-forward (model.Block)
    minimind.py               MiniMind's chat template (its think block)
"""
