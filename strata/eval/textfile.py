"""Evaluation text: a UTF-8 file, split into training head and held-out tail at a line boundary."""

from __future__ import annotations

import os

from strata.errors import StrataError


def split_at_line(text: str, head_fraction: float) -> tuple[str, str]:
    """(head, tail) with the cut at the line start nearest below head_fraction of the characters."""
    cut = text.rfind("\n", 0, int(len(text) * head_fraction)) + 1
    return text[:cut], text[cut:]


def read_text(path: str | os.PathLike, tail_fraction: float | None = None) -> str:
    """The text of a UTF-8 file, or its last tail_fraction cut at a line boundary (the held-out split)."""
    if not os.path.isfile(path):
        raise StrataError(f"{path}: file not found (expected a UTF-8 text file)")
    with open(path, encoding="utf-8", errors="strict") as f:
        text = f.read()
    return split_at_line(text, 1 - tail_fraction)[1] if tail_fraction else text
