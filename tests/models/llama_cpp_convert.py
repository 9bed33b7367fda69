"""Runs llama.cpp's own HF -> GGUF converter (convert_hf_to_gguf.py) on a tiny test checkpoint.

The converter is found at $LLAMA_CPP_DIR or under the repository's .cache/peers/llama_cpp_python-*/vendor/
(the llama-cpp-python sdist unpacked); tests skip when neither exists. The tiny checkpoints carry a BPE
tokenizer trained in the test, whose pre-tokenizer llama.cpp's hash table cannot know: the converter's
pre-tokenizer detection is told "gpt-2" (the byte-level split the tiny tokenizer uses), nothing else changes.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_RUNNER = """
import runpy, sys
llama = sys.argv[1]
sys.path[:0] = [llama + "/gguf-py", llama]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(llama + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def converter_dir() -> Path | None:
    env = os.environ.get("LLAMA_CPP_DIR")
    found = [Path(env)] if env else sorted(ROOT.glob(".cache/peers/llama_cpp_python-*/vendor/llama.cpp"))
    return next((p for p in found if (p / "convert_hf_to_gguf.py").is_file() and (p / "conversion").is_dir()), None)


def convert_to_gguf(model_dir: Path, out: Path) -> Path:
    """model_dir (HF folder) -> out (.gguf, float32 tensors except what the converter keeps quantized)."""
    llama = converter_dir()
    if llama is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py not found (set LLAMA_CPP_DIR)")
    r = subprocess.run([sys.executable, "-c", _RUNNER, str(llama), str(model_dir), "--outfile", str(out),
                        "--outtype", "f32"], capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return out
