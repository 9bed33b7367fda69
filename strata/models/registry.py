"""Maps config.json "architectures" names to model classes."""

from strata.config import ModelConfig
from strata.errors import UnsupportedError
from strata.models.base import CausalLM
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
        Gemma3ForCausalLM,
        GptOssForCausalLM,
    )
}


def model_class(cfg: ModelConfig) -> type[CausalLM]:
    try:
        return MODEL_REGISTRY[cfg.architecture]
    except KeyError:
        raise UnsupportedError(
            f"{cfg.source}: field 'architectures' names {cfg.architecture!r}; supported: "
            + ", ".join(sorted(MODEL_REGISTRY))
        ) from None
