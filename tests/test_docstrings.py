"""Every worked example written as a doctest in a module's docstrings runs and gives
the output shown, with doctest's default options: as `python -m doctest FILE` runs it."""

import doctest
import importlib

import pytest

from conftest import ROOT

MODULES = ["tokenizer", "data", "loss", "model", "training", "tasks", "train_sft",
           "train_dpo", "evaluate", "sample", "formats", "checkpoint", "devices", "errors", "flags",
           "extras.losses", "extras.packed", "extras.chunked_head", "extras.moe",
           "extras.minimind", "extras.variant_state", "extras.precomputed_reference",
           "extras.wandb_log",
           "tools.bench", "tools.convert", "tools.sweep", "tools.iterate", "tools.plot"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module)
    assert result.failed == 0
    with open(f"{ROOT}/{name.replace('.', '/')}.py", encoding="utf-8") as f:
        has_examples = ">>>" in f.read()
    assert (result.attempted > 0) == has_examples  # none skipped by a malformed docstring
