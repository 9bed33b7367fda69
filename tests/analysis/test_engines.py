"""Engines and quantization as the field names them: family, version, defaults, and real bits per weight."""

import pytest

from strata.analysis.engines import default_quant, identify
from strata.analysis.precision import bits, parse_published


@pytest.mark.parametrize("text,name,family,version", [
    ("vLLM 0.19.0 (TP2)", "vllm", "vllm", "0.19.0"), ("SGLang v0.4.6", "sglang", "vllm", "0.4.6"),
    ("llama.cpp b6000", "llama.cpp", "llama.cpp", "b6000"), ("Ollama (llama.cpp CPU)", "ollama", "llama.cpp", None),
    ("KTransformers V0.2 (dual socket)", "ktransformers", "ktransformers", "0.2"),
    ("PowerInfer (SmallThinker branch, llama.cpp-based)", "powerinfer", "llama.cpp", None),
    ("TensorRT-LLM", "tensorrt-llm", "trt-llm", None), ("MoE-Infinity", "moe-infinity", "moe-infinity", None),
    ("mixtral-offloading", "mixtral-offloading", "mixtral-offloading", None), ("MLX", "mlx", "mlx", None),
    ("transformers + accelerate", "transformers", "transformers", None), ("mllm-NPU", "mllm", "mllm", None),
    ("mlx-lm 0.22.1", "mlx", "mlx", "0.22.1"), ("TensorRT-LLM 0.12", "tensorrt-llm", "trt-llm", "0.12"),
    ("llama.cpp (CUDA, llama-bench -ngl 99)", "llama.cpp", "llama.cpp", None),
])
def test_engines_resolve_with_versions(text, name, family, version):
    e = identify(text)
    assert (e.name, e.family, e.version) == (name, family, version) and e.is_known


def test_unknown_engine_is_physics_only():
    e = identify("Luminal")
    assert not e.is_known and e.family == "generic" and "physics-only" in e.describe()


def test_ollama_default_is_q4_k_m_with_its_source():
    fmt, source = default_quant(identify("Ollama"))
    assert fmt == "q4_k_m" and "ollama.com/library" in source
    assert default_quant(identify("vLLM")) is None


@pytest.mark.parametrize("text,engine,fmt,nbits", [
    ("Q4_K_M (GGUF)", "", "q4_k_m", 4.90), ("Q8_0", "", "q8_0", 8.5), ("Q4_0", "", "q4_0", 4.5),
    ("IQ2_XXS", "", "iq2_xxs", 2.0625), ("IQ4_XS_R4", "", "iq4_xs", 4.25), ("Q6_K", "", "q6_k", 6.5625),
    ("Q3_K_M", "", "q3_k_m", 4.00), ("AWQ 4-bit", "", "int4", 4.25), ("4-bit GPTQ", "", "gptq4", 4.25),
    ("MXFP4", "", "mxfp4", 4.25), ("NVFP4", "", "nvfp4", 4.5), ("FP8", "", "fp8", 8.0),
    ("4-bit", "llama.cpp", "q4_0", 4.5), ("4-bit", "mlx", "mlx4", 4.5), ("4-bit", "transformers", "nf4", 4.127),
    ("BF16", "", "fp16", 16.0), ("not stated", "", None, None),
])
def test_quantization_names_and_bits(text, engine, fmt, nbits):
    assert parse_published(text, engine) == fmt
    if fmt:
        assert bits(fmt) == pytest.approx(nbits, abs=1e-3)
