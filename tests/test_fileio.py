"""strata.fileio: a write either replaces the file whole or leaves the old one, never a temporary behind."""

import json

import pytest

from strata.fileio import write_json_atomic, write_text_atomic


def test_writes_and_replaces_without_leftovers(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": 2}, indent=1)
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.txt"
    write_text_atomic(target, "old")
    with pytest.raises(TypeError):
        write_text_atomic(target, b"not text")  # fails inside the write
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
