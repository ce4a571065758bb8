"""Mistakes a user can make and fix (a bad record, a missing or broken checkpoint, a
tokenizer that does not match, flags that cannot go together) end every script with one
line, `error: <what is wrong>` on stderr, and exit status 1. Anything else is a bug in
minidpo and keeps its traceback.

Not run directly: each script's `if __name__ == "__main__":` goes through run_main (the
training scripts through run, which also ends a stopped or diverged run with one line).
"""

import argparse
import atexit
import gc
import signal
import sys


class UserError(ValueError):
    """A problem with the user's files or flags; the message names the file (and line)
    and says what is wrong. A ValueError, so library callers may catch it as one."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad flag is one line, `error: ... (see PROG --help)` on
    stderr and exit status 2, not the whole usage."""

    def error(self, message):
        say(f"error: {message} (see {self.prog} --help)")
        raise SystemExit(2)


def say(line):
    """line and its newline to stderr in one write: under torchrun the ranks share stderr,
    and print's two writes (text, then newline) of two ranks can interleave on one line."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def one_line(message):
    """A message on one line: the lines of a longer one joined with spaces."""
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def run_main(main, *args):
    """Call main(*args); a UserError, or a file that cannot be opened, becomes
    `error: ...` on stderr and exit status 1, without a traceback. The interpreter's exit
    then skips its last garbage collection (gc.freeze): once torch is loaded that pass
    takes 0.4-0.6 s, over objects the operating system frees anyway (Python does not
    promise __del__ at exit either; the scripts close their files and process groups)."""
    atexit.unregister(gc.freeze)  # once, however often main runs in one process
    atexit.register(gc.freeze)
    try:
        return main(*args)
    except UserError as e:
        message = one_line(e)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        if e.filename is None:  # not about a file the user named: a bug, keep the traceback
            raise
        message = f"{e.filename}: {e.strerror.lower()}"
    say(f"error: {message}")
    raise SystemExit(1)


class NonFiniteLoss(UserError):  # ends the run with one line, like a user error
    """A NaN/inf loss in float32/bfloat16 training (in float16 such a step is the
    GradScaler's to skip): training stops with this message."""

    def __init__(self, loss_value, step, dtype_name):
        super().__init__(f"loss became {loss_value} at step {step} ({dtype_name}); stopping. "
                         "The last checkpoint on disk is the last good one. Try a lower "
                         "--lr or a smaller --grad-clip.")


class Interrupted(Exception):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler, or torchrun stopping the other ranks)."""


def run(main):
    """Run a training script's main() so that it ends with one clear line, not a traceback,
    on a user's mistake (run_main), when the loss turns non-finite or when the
    process is asked to stop. Checkpoints are written atomically, so the last one on
    disk is whole either way."""

    def stop(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        run_main(main)
    except Interrupted as e:
        leave_process_group(wait_for_the_others=False)
        raise SystemExit(f"stopped by {e}: the last checkpoint in --out-dir is intact; run "
                         "the same command with --resume to continue from it") from None
    except BaseException:  # an error line (SystemExit) or a bug's traceback: leave at once
        leave_process_group(wait_for_the_others=False)
        raise
    leave_process_group(wait_for_the_others=True)


def leave_process_group(wait_for_the_others):
    """Destroy the process group, if any (else NCCL warns at exit). After a good run,
    once every rank is done (rank 0 may still be saving or printing samples: a rank
    tearing down gloo before the others can abort them); after an error, at once (the
    other ranks may never reach a barrier)."""
    import torch.distributed as dist  # here: the other scripts need no torch to say an error
    if dist.is_initialized():
        if wait_for_the_others:
            dist.barrier()
        dist.destroy_process_group()
