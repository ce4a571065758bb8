"""What a DPO variant carries from step to step, behind train_dpo.py's one hook (a
VariantState: options for the loss, an update after each step, a part of the
checkpoint): BCO's reward shift delta (--loss bco_pair) and TR-DPO's moving reference
(--sync-ref-every).
"""

import torch

RUN_KEYS = ("sync_ref_every", "sync_ref_alpha")  # flags that change the numbers


def add_args(parser):
    parser.add_argument("--sync-ref-every", type=int, default=0,
                        help="TR-DPO: every N steps the reference moves towards the policy "
                        "(0: a fixed reference, as in DPO)")
    parser.add_argument("--sync-ref-alpha", type=float, default=1.0,
                        help="TR-DPO: reference <- alpha * policy + (1 - alpha) * reference "
                        "(1: a hard copy)")


def check_args(parser, args, reference_free_losses):
    if args.sync_ref_every and (args.precompute_ref or args.reference_free
                                or args.loss in reference_free_losses):
        parser.error("--sync-ref-every moves the reference during training: it needs a "
                     "reference model, so not --precompute-ref (reference log-probs computed "
                     f"once), --reference-free or --loss {'/'.join(reference_free_losses)}")
    if not 0 < args.sync_ref_alpha <= 1:
        parser.error("--sync-ref-alpha must be in (0, 1]")


class VariantState:
    """BCO's delta (the mean reward of the steps so far) and TR-DPO's reference sync; with
    --resume, what the checkpoint holds of them."""

    def __init__(self, args, reference, resume):
        self.args, self.reference = args, reference
        state = resume["train_state"].get("dpo", {}) if resume else {}
        if state.get("reference") is not None:
            reference.load_state_dict(state["reference"])
        self.bco_delta = state.get("bco_delta", 0.0)

    def loss_options(self):
        """The loss's own inputs from this state (loss.dpo_loss passes them on)."""
        return {"bco_delta": self.bco_delta}

    def after_step(self, done, record, skipped, policy):
        """Step `done` is over: its logged (all-rank) record; whether it was skipped."""
        # BCO: delta = running mean of the rewards of the steps so far; this step used the
        # delta of the steps before it (TRL's older code also counted the current batch and
        # evaluation batches; TRL 1.16 has no delta at all)
        if self.args.loss == "bco_pair" and not skipped:  # a skipped step leaves it as it is
            mean_reward = (record["rewards/chosen"] + record["rewards/rejected"]) / 2
            self.bco_delta += (mean_reward - self.bco_delta) / done
        if self.args.sync_ref_every and done % self.args.sync_ref_every == 0:  # TR-DPO
            with torch.no_grad():
                for r, p in zip(self.reference.parameters(), policy.parameters()):
                    r.lerp_(p, self.args.sync_ref_alpha)  # r = r + alpha (p - r)

    def state_dict(self):
        return {"bco_delta": self.bco_delta, "reference": (
            self.reference.state_dict() if self.args.sync_ref_every else None)}
