"""Every worked example written as a doctest in a module's docstrings runs and gives
the output shown."""

import doctest
import importlib

import pytest

from conftest import ROOT

MODULES = ["tokenizer", "data", "loss", "model", "training", "tasks", "train_sft",
           "train_dpo", "evaluate", "sample", "bench", "convert", "sweep"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    with open(f"{ROOT}/{name}.py", encoding="utf-8") as f:
        has_examples = ">>>" in f.read()
    assert (result.attempted > 0) == has_examples  # none skipped by a malformed docstring
