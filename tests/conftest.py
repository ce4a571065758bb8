"""Shared pytest fixtures: the shipped tokenizer and a helper that writes data files."""

import json
import os

import pytest

import tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def enc():
    return tokenizer.load_tokenizer()


@pytest.fixture
def write_file(tmp_path):
    """write_file(name, records_or_text) -> path; records are written one JSON per line."""

    def write(name, content):
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        elif name.endswith(".json"):
            path.write_text(json.dumps(content), encoding="utf-8")
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in content), encoding="utf-8")
        return str(path)

    return write
