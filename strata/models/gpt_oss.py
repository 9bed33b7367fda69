"""GPT-OSS (GptOssForCausalLM, model_type gpt_oss).

What differs from the Llama-style decoder:
- attention with biases and per-head learned sinks (a logit in every softmax denominator, no value), layers
  alternating sliding-window and full attention (`layer_types`), yarn rotary;
- a MoE block in every layer: the router has a bias and takes the top-k logits, then a softmax over those k;
- experts with biases and a clamped SwiGLU: gate and up interleaved in the fused `gate_up_proj` (even columns
  gate, odd up), gate clamped above at `swiglu_limit`, up clamped to +-limit, out = (up + 1) * gate *
  sigmoid(alpha * gate) with alpha = swiglu_alpha (1.702);
- expert weights as the checkpoint stacks them (`experts.gate_up_proj [E, H, 2I]`, transposed against nn.Linear)
  or, with quantization_config.quant_method "mxfp4", as MXFP4 blocks and e8m0 scales (`*_blocks [E, out, in/32,
  16]`, `*_scales [E, out, in/32]`), run by the mxfp4 format of quant/format.py without a float copy.
The loader splits stacked expert tensors per expert, so the experts go through SparseMoeBlock's dispatch and
the expert tiers (--memory-budget) like any other family's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from strata.config import HFFields, ModelConfig
from strata.errors import ConfigError, UnsupportedError
from strata.layers.linear import Linear
from strata.layers.moe import SparseMoeBlock
from strata.layers.quant_linear import quantized_linear
from strata.models.base import Attention, CausalLM
from strata.quant.format import QuantFormat

SLIDING, FULL = "sliding_attention", "full_attention"
MXFP4 = QuantFormat.parse("mxfp4")


@dataclass
class GptOssConfig(ModelConfig):
    """gpt_oss's config.json (transformers' defaults where a key is absent)."""

    layer_types: list[str] = field(default_factory=list)
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    mxfp4_experts: bool = False  # quantization_config.quant_method "mxfp4": experts as *_blocks / *_scales

    needs_experts = True
    attention_bias_default = True

    @classmethod
    def hf_fields(cls, f: HFFields) -> dict:
        source = f.source
        n = f.need("num_hidden_layers")
        types = f.get("layer_types") or [SLIDING if (i + 1) % 2 else FULL for i in range(n)]
        if len(types) != n or any(t not in (SLIDING, FULL) for t in types):
            raise ConfigError(f"{source}: field 'layer_types' must list {n} of {SLIDING!r} / {FULL!r}, got {types!r}")
        method = (f.get("quantization_config") or {}).get("quant_method")
        if method not in (None, "mxfp4"):
            raise UnsupportedError(f"{source}: quantization_config.quant_method {method!r}: gpt_oss checkpoints "
                                   "run unquantized or with mxfp4 experts")
        positive = (lambda v: v > 0, "a number > 0")
        return {**super().hf_fields(f), "layer_types": list(types),
                "sliding_window": int(f.number("sliding_window", 128, *positive)),
                "swiglu_limit": f.number("swiglu_limit", 7.0, *positive),
                "swiglu_alpha": f.number("swiglu_alpha", 1.702, *positive), "mxfp4_experts": method == "mxfp4"}

    def uses_sliding_window(self, layer_idx: int) -> bool:
        return self.layer_types[layer_idx] == SLIDING

    def attention_param_count(self) -> int:  # with o_proj's bias, the sinks, and the router's bias (per expert)
        return super().attention_param_count() + self.hidden_size + self.num_attention_heads + self.num_experts

    @property
    def expert_param_count(self) -> int:  # with the gate_up and down biases
        return super().expert_param_count + 2 * self.moe_intermediate_size + self.hidden_size


class GptOssAttention(Attention):
    def __init__(self, cfg: GptOssConfig, layer_idx: int):
        super().__init__(cfg, layer_idx, None, cfg.attention_bias, cfg.attention_bias)  # sliding: cfg's rule
        self.sinks = nn.Parameter(torch.zeros(cfg.num_attention_heads))  # [Hq]


class GptOssExpert(nn.Module):
    """One expert, tensors named as the checkpoint's stacked ones (one expert's slice of each)."""

    def __init__(self, cfg: GptOssConfig):
        super().__init__()
        h, i = cfg.hidden_size, cfg.moe_intermediate_size
        self.hidden_size, self.intermediate_size = h, i
        self.limit, self.alpha = cfg.swiglu_limit, cfg.swiglu_alpha
        self.mxfp4 = cfg.mxfp4_experts
        if self.mxfp4:
            if h % 32 or i % 32:
                raise ConfigError(f"{cfg.source}: mxfp4 experts need hidden_size and intermediate_size divisible "
                                  f"by 32, got {h} and {i}")
            self.register_buffer("gate_up_proj_blocks", torch.zeros(2 * i, h // 32, 16, dtype=torch.uint8))
            self.register_buffer("gate_up_proj_scales", torch.zeros(2 * i, h // 32, dtype=torch.uint8))
            self.register_buffer("down_proj_blocks", torch.zeros(h, i // 32, 16, dtype=torch.uint8))
            self.register_buffer("down_proj_scales", torch.zeros(h, i // 32, dtype=torch.uint8))
        else:
            self.gate_up_proj = nn.Parameter(torch.zeros(h, 2 * i))  # [H, 2I]: x @ gate_up_proj
            self.down_proj = nn.Parameter(torch.zeros(i, h))  # [I, H]
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(2 * i))
        self.down_proj_bias = nn.Parameter(torch.zeros(h))

    def _project(self, x: torch.Tensor, name: str, out_features: int, in_features: int) -> torch.Tensor:
        bias = getattr(self, f"{name}_bias")
        if not self.mxfp4:
            return x @ getattr(self, name) + bias  # [N, out]
        blocks = getattr(self, f"{name}_blocks")  # [out, in/32, 16]
        tensors = {"qweight": blocks.reshape(out_features, in_features // 2), "scales": getattr(self, f"{name}_scales")}
        return quantized_linear(x, MXFP4, tensors, out_features, in_features, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, i = self.hidden_size, self.intermediate_size
        gate_up = self._project(x, "gate_up_proj", 2 * i, h)  # [N, 2I], gate and up interleaved
        gate = gate_up[..., ::2].clamp(max=self.limit)
        up = gate_up[..., 1::2].clamp(-self.limit, self.limit)
        glu = gate * torch.sigmoid(gate * self.alpha)  # [N, I]
        return self._project((up + 1) * glu, "down_proj", h, i)  # [N, H]


class GptOssMoeBlock(SparseMoeBlock):
    """The router (`mlp.router` in the checkpoint, `gate` here as in every block) has a bias; it keeps the top-k
    logits and softmaxes over those k only."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, expert_factory):
        super().__init__(cfg, layer_idx, expert_factory)
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, bias=True)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)  # [T, E]
        if self.routing_override is not None:
            return self.routing_override(self, logits)
        top, ids = torch.topk(logits, self.top_k, dim=-1)  # [T, k]
        weights = F.softmax(top.float(), dim=-1).to(top.dtype)  # in the model dtype, as transformers
        return weights.float(), ids


class GptOssForCausalLM(CausalLM):
    config_class = GptOssConfig
    own_quant_methods = ("mxfp4",)

    @classmethod
    def sanitize(cls, name: str) -> str | None:
        name = super().sanitize(name)
        return None if name is None else name.replace(".mlp.router.", ".mlp.gate.")

    @classmethod
    def make_attention(cls, cfg: GptOssConfig, layer_idx: int) -> nn.Module:
        return GptOssAttention(cfg, layer_idx)

    @classmethod
    def make_mlp(cls, cfg: GptOssConfig, layer_idx: int) -> nn.Module:
        return GptOssMoeBlock(cfg, layer_idx, lambda: GptOssExpert(cfg))
