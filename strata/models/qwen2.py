"""Qwen2 (Qwen2ForCausalLM): biases on q/k/v (not on o_proj); a sliding window only where the config turns it
on (use_sliding_window) and only for the layers from max_window_layers on."""

from __future__ import annotations

from dataclasses import dataclass

from strata.config import HFFields, ModelConfig
from strata.models.base import CausalLM


@dataclass
class Qwen2Config(ModelConfig):
    use_sliding_window: bool = False
    max_window_layers: int | None = None  # layers >= this use the sliding window

    attention_bias_default = True

    @classmethod
    def hf_fields(cls, f: HFFields) -> dict:
        return {**super().hf_fields(f), "use_sliding_window": f.flag("use_sliding_window", False),
                "max_window_layers": f.get("max_window_layers")}

    def uses_sliding_window(self, layer_idx: int) -> bool:
        if not self.sliding_window or not self.use_sliding_window:
            return False
        return layer_idx >= (self.max_window_layers or 0)


class Qwen2ForCausalLM(CausalLM):
    config_class = Qwen2Config

    @staticmethod
    def qkv_bias(cfg) -> bool:
        return True

    @staticmethod
    def o_bias(cfg) -> bool:
        return False
