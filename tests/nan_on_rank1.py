"""A test helper, run under torchrun by tests/test_reliability.py: train_dpo.py whose loss
turns NaN on rank 1 only, at its third step (step index 2)."""

import os

import errors
import train_dpo

real_dpo_loss = train_dpo.dpo_loss
calls = []


def dpo_loss_nan_on_rank1(*args, **kwargs):
    calls.append(1)
    losses, chosen_rewards, rejected_rewards = real_dpo_loss(*args, **kwargs)
    if os.environ.get("RANK") == "1" and len(calls) == 3:
        losses = losses * float("nan")
    return losses, chosen_rewards, rejected_rewards


if __name__ == "__main__":
    train_dpo.dpo_loss = dpo_loss_nan_on_rank1
    errors.run(train_dpo.main)
