"""Mistakes a user can make and fix (a bad record, a missing or broken checkpoint, a
tokenizer that does not match, flags that cannot go together) end every script with one
line, `error: <what is wrong>` on stderr, and exit status 1. Anything else is a bug in
minidpo and keeps its traceback.

Not run directly: each script's `if __name__ == "__main__":` goes through run_main.
"""

import argparse
import sys


class UserError(ValueError):
    """A problem with the user's files or flags; the message names the file (and line)
    and says what is wrong. A ValueError, so library callers may catch it as one."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad flag is one line, `error: ... (see PROG --help)` on
    stderr and exit status 2, not the whole usage."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def one_line(message):
    """A message on one line: the lines of a longer one joined with spaces."""
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def run_main(main, *args):
    """Call main(*args); a UserError, or a file that cannot be opened, becomes
    `error: ...` on stderr and exit status 1, without a traceback."""
    try:
        return main(*args)
    except UserError as e:
        message = one_line(e)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        if e.filename is None:  # not about a file the user named: a bug, keep the traceback
            raise
        message = f"{e.filename}: {e.strerror.lower()}"
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)
