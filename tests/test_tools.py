"""The tools run by hand, run the way a person runs them, on a small scale."""

import os
import shutil
import subprocess
import sys

from conftest import ROOT


def test_the_mutation_check_kills_a_planted_sign_flip(tmp_path):
    """`python -m tools.mutants --tree T --only NAME` copies T, plants the bug, runs its
    tests and says what killed it."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", "out", "__pycache__",
                                                              ".pytest_cache"))
    result = subprocess.run([sys.executable, "-m", "tools.mutants", "--tree", str(tree),
                             "--only", "sigmoid-sign"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    row = [line for line in result.stdout.splitlines() if line.startswith("| sigmoid-sign")]
    assert len(row) == 1 and "| killed | tests/test_loss.py::" in row[0], result.stdout
    assert "1 of 1 mutants killed" in result.stdout
    with open(os.path.join(tree, "loss.py"), encoding="utf-8") as f:  # the copy's copy only
        assert "losses = -F.logsigmoid(beta * h)  # Eq. 7" in f.read()
