"""LLMEngine.describe: the server's start-up line (model, compute dtype, threads, capacity), with a hint where a
quantized model computes in float32."""

import torch

from strata.config import EngineConfig
from strata.engine.llm_engine import LLMEngine


def test_describes_the_bundled_model_and_its_defaults():
    engine = LLMEngine(EngineConfig(num_threads=1, max_num_seqs=4), progress=False)
    line = engine.describe()
    assert line.startswith("shakespeare-moe: bfloat16 compute, 1 thread, up to 4 sequences of ")
    assert f"KV cache {engine.runner.num_blocks * engine.runner.block_size} tokens" in line
    assert "float32" not in line


def test_quantized_float32_model_gets_the_bfloat16_hint(tmp_path):
    from tests.weights.conftest import build
    from tests.weights.gguf_writer import write_gguf

    build("llama", tmp_path / "hf")
    path = write_gguf(tmp_path / "hf", tmp_path / "m.gguf", qtype="Q8_0")
    engine = LLMEngine(EngineConfig(model=str(path), num_threads=1), progress=False)
    assert engine.runner.dtype == torch.float32
    assert "float32 compute" in engine.describe() and "--dtype bfloat16 runs faster" in engine.describe()
    engine = LLMEngine(EngineConfig(model=str(path), num_threads=1, dtype="bfloat16"), progress=False)
    assert "bfloat16 compute" in engine.describe() and "--dtype" not in engine.describe()
