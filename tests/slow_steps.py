"""A test helper, run under torchrun by tests/test_reliability.py: train_dpo.py with every
step 50 ms slower (the same numbers; the delay sits in the step's learning-rate look-up),
so that a rank killed after the first checkpoint is killed mid-run on any machine,
however fast."""

import time

import errors
import train_dpo
import training

real_lr_at = training.lr_at


def slow_lr_at(*args, **kwargs):
    time.sleep(0.05)
    return real_lr_at(*args, **kwargs)


if __name__ == "__main__":
    training.lr_at = slow_lr_at
    errors.run(train_dpo.main)
