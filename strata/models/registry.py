"""Maps config.json "architectures" names to model classes, and config.json to the family's config."""

from __future__ import annotations

import os

from strata.config import ModelConfig, hf_architecture, hf_config_dict, read_config_json
from strata.errors import UnsupportedError
from strata.models.base import CausalLM
from strata.models.deepseek_v2 import DeepseekV2ForCausalLM
from strata.models.deepseek_v3 import DeepseekV3ForCausalLM
from strata.models.gemma3 import Gemma3ForCausalLM
from strata.models.gpt_oss import GptOssForCausalLM
from strata.models.llama import LlamaForCausalLM
from strata.models.mistral import MistralForCausalLM
from strata.models.mixtral import MixtralForCausalLM
from strata.models.olmoe import OlmoeForCausalLM
from strata.models.qwen2 import Qwen2ForCausalLM
from strata.models.qwen2_moe import Qwen2MoeForCausalLM
from strata.models.qwen3 import Qwen3ForCausalLM
from strata.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    cls.__name__: cls
    for cls in (
        LlamaForCausalLM,
        MistralForCausalLM,
        Qwen2ForCausalLM,
        Qwen3ForCausalLM,
        MixtralForCausalLM,
        Qwen2MoeForCausalLM,
        Qwen3MoeForCausalLM,
        OlmoeForCausalLM,
        DeepseekV2ForCausalLM,
        DeepseekV3ForCausalLM,
        Gemma3ForCausalLM,
        GptOssForCausalLM,
    )
}


def _lookup(arch: str, source: str) -> type[CausalLM]:
    try:
        return MODEL_REGISTRY[arch]
    except KeyError:
        raise UnsupportedError(
            f"{source}: field 'architectures' names {arch!r}; supported: " + ", ".join(sorted(MODEL_REGISTRY))
        ) from None


def model_class(cfg: ModelConfig) -> type[CausalLM]:
    return _lookup(cfg.architecture, cfg.source)


def config_from_dict(d: dict, source: str = "config.json") -> ModelConfig:
    """The family's config (its `config_class.from_hf`) for a parsed config.json; one-line errors."""
    d = hf_config_dict(d, source)
    return _lookup(hf_architecture(d, source), source).config_class.from_hf(d, source)


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The family's config for a model folder or a config.json path."""
    cfg_path, d = read_config_json(path)
    return config_from_dict(d, cfg_path)
