"""A test helper, run under torchrun by tests/test_reliability.py: train_dpo.py with every
optimizer step 50 ms slower (the same numbers), so that a rank killed after the first
checkpoint is killed mid-run on any machine, however fast."""

import time

import train_dpo
import training

real_optimizer_step = train_dpo.optimizer_step


def slow_optimizer_step(*args, **kwargs):
    time.sleep(0.05)
    return real_optimizer_step(*args, **kwargs)


if __name__ == "__main__":
    train_dpo.optimizer_step = slow_optimizer_step
    training.run(train_dpo.main)
