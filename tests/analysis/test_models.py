"""Model names as the field writes them resolve to the right preset, say which one, and keep their quantization;
every preset is a buildable shape with a source."""

import pytest

from strata.analysis.models import find_preset, resolve_model, split_name
from strata.analysis.shapes import load_presets, shape_from_dict
from strata.errors import ConfigError


@pytest.mark.parametrize("name,key,fmts", [
    ("ggml-org/gpt-oss-20b-GGUF", "gpt-oss-20b", {"weights": "q8_0", "experts": "mxfp4"}),
    ("Qwen3-Coder-30B-A3B-Instruct-Q8_0-GGUF", "qwen3-30b-a3b", {"weights": "q8_0"}),
    ("LLaMA-7B", "llama-7b", {}),
    ("Llama-2-7b-chat", "llama-2-7b", {}),
    ("meta-llama/Meta-Llama-3-8B-Instruct", "llama-3-8b", {}),
    ("llama3.1:8b", "llama-3-8b", {}),
    ("gpt-oss:120b", "gpt-oss-120b", {"weights": "bf16", "experts": "mxfp4"}),
    ("Mistral-7B-Instruct-v0.3", "mistral-7b", {}),
    ("mistralai/Mistral-7B-Instruct-v0.1", "mistral-7b-v0.1", {}),
    ("unsloth/DeepSeek-R1-Distill-Qwen-32B-GGUF", "qwen2.5-32b", {}),
    ("deepseek-ai/DeepSeek-R1", "deepseek-v3", {"weights": "fp8"}),
    ("Qwen/Qwen2.5-Coder-32B-Instruct-AWQ", "qwen2.5-32b", {"weights": "int4"}),
    ("TheBloke/Mixtral-8x7B-Instruct-v0.1-GPTQ", "mixtral-8x7b", {"weights": "gptq4"}),
    ("microsoft/Phi-3.5-MoE-instruct", "phi-3.5-moe", {}),
    ("google/gemma-3-27b-it-qat-q4_0-gguf", "gemma-3-27b", {"weights": "q4_0"}),
    ("Qwen/Qwen3-235B-A22B-Instruct-2507", "qwen3-235b-a22b", {}),
    ("bartowski/Llama-3.3-70B-Instruct-IQ2_XXS-GGUF", "llama-3-70b", {"weights": "iq2_xxs"}),
])
def test_field_names_resolve(name, key, fmts):
    r = resolve_model(name)
    assert r.key == key and r.formats == fmts
    if name.lower() != key:  # the resolution says which entry it took
        assert r.notes and key in r.notes[0]


def test_extended_names_take_the_longest_catalog_name_of_the_same_size():
    key, how = find_preset("Llama-3.1-8B-Instruct-abliterated")
    assert key == "llama-3-8b" and "extends" in how
    assert find_preset("Llama-3.1-13B-something")[0] is None  # no 13B Llama 3.1: sizes must agree
    assert find_preset("Qwen3-30B")[0] is None  # 30B is not 30B-A3B


def test_unknown_name_is_a_one_line_error_with_suggestions():
    with pytest.raises(ConfigError, match="not a folder, config.json, .gguf file nor a catalog name"):
        resolve_model("acme/SuperModel-9000")


def test_split_name_strips_packaging_and_keeps_the_quantization():
    assert split_name("ggml-org/Qwen3-Coder-30B-A3B-Instruct-Q4_K_M-GGUF") == (["qwen3", "coder", "30b", "a3b"],
                                                                               "q4_k_m")
    assert split_name("mlx-community/Llama-3.2-3B-Instruct-4bit")[1] == "4bit"


def test_every_preset_builds_and_names_its_source():
    presets = load_presets()
    assert len(presets) >= 90
    families = ("llama-2", "llama-3.2", "llama-4", "mistral", "mixtral", "qwen1.5", "qwen2-", "qwen2.5", "qwen3-",
                "qwen3-coder", "deepseek-v2-lite", "deepseek-v3", "deepseek-r1-distill", "gpt-oss", "gemma-2",
                "gemma-3", "phi-3", "phi-3.5-moe", "phi-4", "olmoe", "smallthinker", "granite", "nllb-moe")
    for fam in families:
        assert any(k.startswith(fam) for k in presets), fam
    for key, p in presets.items():
        assert p["source"], key
        s = shape_from_dict(p["config"], name=key)
        assert s.param_counts()["total"] > 0


@pytest.mark.parametrize("key,total,active", [
    ("llama-3.1-405b", 405.9, 405.9), ("mixtral-8x22b", 141, 39), ("qwen3-235b-a22b", 235, 22),
    ("deepseek-v2-lite", 15.7, 2.7), ("gpt-oss-120b", 116.8, 5.7), ("phi-3.5-moe", 41.9, 6.6),
    ("qwen2-57b-a14b", 57.4, 14.2), ("llama-4-scout-17b-16e", 109, 17), ("gemma-2-27b", 27.2, 27.2),
])
def test_presets_match_published_parameter_counts(key, total, active):
    c = shape_from_dict(load_presets()[key]["config"], name=key).param_counts()
    assert c["total"] / 1e9 == pytest.approx(total, rel=0.03)
    assert c["active"] / 1e9 == pytest.approx(active, rel=0.05)
