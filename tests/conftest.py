"""Shared pytest fixtures: the real stories260K model converted once per session into an HF folder."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
STORIES260K = SHARED_DATA / "stories260k"
HANG_S = 60  # a call that used to hang fails after this long instead


@pytest.fixture(scope="session")
def stories260k_hf(tmp_path_factory) -> Path:
    """HF Llama folder converted from stories260K.bin + tok512.bin (skips if ../shared/data is absent)."""
    ckpt, tok = STORIES260K / "stories260K.bin", STORIES260K / "tok512.bin"
    if not (ckpt.is_file() and tok.is_file()):
        pytest.skip(f"{STORIES260K} not available")
    from strata.weights.llama2c import convert_llama2c

    return convert_llama2c(ckpt, tok, tmp_path_factory.mktemp("stories260k") / "hf")


def within(fn, timeout: float = HANG_S):
    """fn() in a daemon thread; fails the test (instead of hanging it) when it does not return in time."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"did not finish within {timeout} s (hang)")
    if "error" in box:
        raise box["error"]
    return box["value"]
