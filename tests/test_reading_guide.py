"""The tutorial path: the README's reading guide names only functions that exist in the
card's files, at most three a question; no support module or extra imports a script;
the core stays within its line bounds."""

import ast
import difflib
import importlib
import os
import re
import sys

from conftest import ROOT

CARD_FILES = ("train_dpo.py", "train_sft.py", "loss.py", "data.py", "model.py")
SCRIPTS = {"train_sft", "train_dpo", "evaluate", "sample", "tools"}  # entry points
CORE = ("train_sft.py", "train_dpo.py", "model.py", "data.py", "loss.py", "training.py")


def reading_guide():
    """{question number: its text} from the README's "Reading guide" section."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Reading guide", 1)[1].split("\n## ", 1)[0]
    items = re.split(r"\n(\d)\. ", section)[1:]
    return {int(n): body for n, body in zip(items[::2], items[1::2])}


def test_the_guide_has_eight_questions_each_answered_in_at_most_three_card_functions():
    guide = reading_guide()
    assert sorted(guide) == list(range(1, 9))
    for n, text in guide.items():
        named = set(re.findall(r"`([\w/]+\.py):([\w.]+)`", text))
        assert 1 <= len(named) <= 3, (n, named)
        for path, name in named:
            assert path in CARD_FILES, f"question {n}: {path} is not one of the card's files"
            obj = importlib.import_module(path[:-3])
            for part in name.split("."):
                assert hasattr(obj, part), f"question {n}: {path} has no {name}"
                obj = getattr(obj, part)
            assert callable(obj)
        for path, section in re.findall(r"`([\w/]+\.py):main` section (\d)", text):
            with open(os.path.join(ROOT, path), encoding="utf-8") as f:
                assert f"\n    # {section}. " in f.read(), f"question {n}: no section {section}"


def test_the_guide_check_fails_on_a_function_that_is_not_there(monkeypatch):
    """The check above, on a guide that names a function no card file has."""
    wrong = dict(reading_guide())
    wrong[4] = wrong[4].replace("`loss.py:reference_logps`", "`loss.py:reference_model`")
    monkeypatch.setattr(sys.modules[__name__], "reading_guide", lambda: wrong)
    try:
        test_the_guide_has_eight_questions_each_answered_in_at_most_three_card_functions()
    except AssertionError as e:
        assert "reference_model" in str(e)
    else:
        raise AssertionError("a guide naming a missing function passed")


def imported_modules(path):
    """The top-level names of every module a file imports, anywhere in it."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_support_module_or_extra_imports_a_script():
    """Dependence runs one way: scripts import support modules and extras, never back."""
    library = [f for f in os.listdir(ROOT) if f.endswith(".py")
               and f[:-3] not in SCRIPTS] + [os.path.join("extras", f) for f in
                                              os.listdir(os.path.join(ROOT, "extras"))
                                              if f.endswith(".py")]
    assert "checkpoint.py" in library and "extras/packed.py" in library
    for path in library:
        wrong = imported_modules(os.path.join(ROOT, path)) & SCRIPTS
        assert not wrong, f"{path} imports the script(s) {sorted(wrong)}"


def test_the_core_stays_within_its_line_bounds():
    """wc -l of the core <= 1,400, and at most 200 lines changed between train_sft.py and
    train_dpo.py (README: `diff train_sft.py train_dpo.py | wc -l`, headers too)."""
    lines = {}
    for name in CORE:
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            lines[name] = f.read().splitlines()
    assert sum(len(v) for v in lines.values()) <= 1400
    changed = [line for line in difflib.unified_diff(lines["train_sft.py"],
                                                    lines["train_dpo.py"], n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert len(changed) <= 200
