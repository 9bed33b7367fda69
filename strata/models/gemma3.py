"""Gemma 3 text (Gemma3ForCausalLM, model_type gemma3_text).

What differs from the Llama-style decoder:
- a pattern of sliding-window and global layers (`layer_types`, or every `sliding_window_pattern`-th layer
  global in older configs), each kind with its own rotary base: `rope_local_base_freq` (or
  rope_parameters.sliding_attention) for sliding layers, `rope_theta` and `rope_scaling` (or
  rope_parameters.full_attention) for global ones;
- RMSNorm computing `norm(x) * (1 + weight)` in float32 (weights stored as offsets from 1), per-head q/k
  norms, and four norms per block: input, post_attention, pre_feedforward, post_feedforward;
- embeddings scaled by sqrt(hidden_size), the factor rounded to the model dtype as transformers does;
- a gelu-tanh gated MLP; attention scaled by `query_pre_attn_scalar ** -0.5`; tied embeddings by default;
- `final_logit_softcapping` (tanh) when set. `attn_logit_softcapping` (Gemma 2) is refused.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from strata.config import HFFields, ModelConfig
from strata.errors import ConfigError, UnsupportedError
from strata.layers.mlp import MLP
from strata.layers.rotary import RotaryEmbedding
from strata.models.base import Attention, CausalLM

SLIDING, FULL = "sliding_attention", "full_attention"


def _rope_scaling(s: dict | None) -> dict | None:
    """An HF rope dict -> Strata's rope_scaling (None for the default rope)."""
    if not s:
        return None
    rtype = s.get("rope_type", s.get("type", "default"))
    return None if rtype == "default" else {**s, "rope_type": rtype}


@dataclass
class Gemma3TextConfig(ModelConfig):
    """gemma3_text's config.json; rope_theta and rope_scaling are the global layers' (transformers' defaults)."""

    layer_types: list[str] = field(default_factory=list)
    query_pre_attn_scalar: float = 256
    rope_local_base_freq: float = 10_000.0  # sliding layers
    final_logit_softcapping: float | None = None

    @classmethod
    def hf_fields(cls, f: HFFields) -> dict:
        d, source = f.d, f.source
        n = f.need("num_hidden_layers")
        if d.get("attn_logit_softcapping") is not None:
            raise UnsupportedError(f"{source}: field 'attn_logit_softcapping' is set "
                                   f"({d['attn_logit_softcapping']!r}); Gemma 3 runs without it (expected null)")
        if d.get("use_bidirectional_attention"):
            raise UnsupportedError(f"{source}: field 'use_bidirectional_attention' is true; only causal "
                                   "attention is supported")
        act = f.get("hidden_activation", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise UnsupportedError(f"{source}: field 'hidden_activation' must be gelu_pytorch_tanh, got {act!r}")
        pattern = f.get("sliding_window_pattern") or f.get("_sliding_window_pattern") or 6
        types = f.get("layer_types") or [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
        if len(types) != n or any(t not in (SLIDING, FULL) for t in types):
            raise ConfigError(f"{source}: field 'layer_types' must list {n} of {SLIDING!r} / {FULL!r}, got {types!r}")
        rope = f.get("rope_parameters", {})
        if FULL in rope or SLIDING in rope:  # transformers 5: one rope dict per layer type
            full, local = rope.get(FULL) or {}, rope.get(SLIDING) or {}
            theta, scaling = full.get("rope_theta", 1_000_000.0), _rope_scaling(full)
            local_theta = local.get("rope_theta", 10_000.0)
        else:
            theta, scaling = f.get("rope_theta", 1_000_000.0), _rope_scaling(f.get("rope_scaling"))
            local_theta = f.get("rope_local_base_freq", 10_000.0)
        cap = f.get("final_logit_softcapping")
        positive = (lambda v: v > 0, "a number > 0")
        return {
            **super().hf_fields(HFFields({**d, "rope_parameters": None, "rope_scaling": scaling}, source)),
            "rope_theta": f.number("rope_theta", 0, *positive, theta),
            "rope_local_base_freq": f.number("rope_local_base_freq", 0, *positive, local_theta),
            "rope_scaling": scaling,
            "sliding_window": int(f.number("sliding_window", 4096, *positive)),
            "query_pre_attn_scalar": f.number("query_pre_attn_scalar", 256, *positive),
            "final_logit_softcapping": None if cap is None else f.number("final_logit_softcapping", 0, *positive),
            "tie_word_embeddings": f.flag("tie_word_embeddings", True),
            "layer_types": list(types),
        }

    def uses_sliding_window(self, layer_idx: int) -> bool:
        return self.layer_types[layer_idx] == SLIDING

    def attention_param_count(self) -> int:  # with q/k norms, and the block's two norms beyond input/post-attn
        return super().attention_param_count() + 2 * self.head_dim + 2 * self.hidden_size


class Gemma3RMSNorm(nn.Module):
    """norm(x) * (1 + weight) in float32, cast back at the end; `forward(x, residual)` as RMSNorm's."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            x = x + residual
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.variance_epsilon)  # [.., H] float32
        out = (h * (1.0 + self.weight.float())).to(x.dtype)
        return out if residual is None else (out, x)


class Gemma3ScaledEmbedding(nn.Embedding):
    scale_by_sqrt_dim = True  # read by QuantEmbedding when the table is kept quantized

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor(self.embedding_dim**0.5, dtype=self.weight.dtype)  # 55.4256 -> 55.5 in bf16, as HF
        return super().forward(input_ids) * scale  # [T, H]


class Gemma3MLP(MLP):
    act_fn = staticmethod(functools.partial(F.gelu, approximate="tanh"))


class Gemma3Rotary:
    """cos/sin for both layer kinds: ({layer type: cos [T, 1, D]}, {layer type: sin [T, 1, D]})."""

    def __init__(self, cfg: Gemma3TextConfig):
        self.by_type = {
            FULL: RotaryEmbedding(cfg),
            SLIDING: RotaryEmbedding(dataclasses.replace(cfg, rope_theta=cfg.rope_local_base_freq, rope_scaling=None)),
        }

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype):
        pairs = {t: r(positions, dtype) for t, r in self.by_type.items()}
        return {t: p[0] for t, p in pairs.items()}, {t: p[1] for t, p in pairs.items()}


class Gemma3Attention(Attention):
    def __init__(self, cfg: Gemma3TextConfig, layer_idx: int):
        super().__init__(cfg, layer_idx, None, cfg.attention_bias, cfg.attention_bias)  # sliding: cfg's rule
        self.layer_type = cfg.layer_types[layer_idx]
        self.qk_norm = "head"
        self.q_norm = Gemma3RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = Gemma3RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.scale = cfg.query_pre_attn_scalar**-0.5

    def forward(self, x, cos, sin, meta, kv_cache) -> torch.Tensor:
        return super().forward(x, cos[self.layer_type], sin[self.layer_type], meta, kv_cache)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, family: type[CausalLM]):
        super().__init__()
        self.self_attn = family.make_attention(cfg, layer_idx)
        self.mlp = Gemma3MLP(cfg.hidden_size, cfg.intermediate_size)
        self.mlp_name = "mlp"
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, Gemma3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))

    def forward(self, x, residual, cos, sin, meta, kv_cache):
        """Same contract as DecoderLayer: (previous block's output, residual stream before it) -> the pair for
        the next block. Both sublayers' outputs are normed before they join the stream."""
        if residual is not None:
            x = x + residual  # [T, H] the residual stream
        h = self.self_attn(self.input_layernorm(x), cos, sin, meta, kv_cache)
        x = x + self.post_attention_layernorm(h)
        h = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return h, x


class Gemma3ForCausalLM(CausalLM):
    config_class = Gemma3TextConfig
    decoder_layer_class = Gemma3DecoderLayer
    supports_tensor_parallel = False  # its own block and per-kind rotary are untested under the tensor-parallel split

    @classmethod
    def make_attention(cls, cfg: ModelConfig, layer_idx: int) -> nn.Module:
        return Gemma3Attention(cfg, layer_idx)

    def __init__(self, cfg: Gemma3TextConfig):
        super().__init__(cfg)
        self.model.embed_tokens = Gemma3ScaledEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.model.norm = Gemma3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def post_load(self) -> None:
        super().post_load()
        self.rotary = Gemma3Rotary(self.config)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        out = super().forward(*args, **kwargs)
        cap = self.config.final_logit_softcapping
        if cap is None or kwargs.get("return_hidden") or (len(args) > 5 and args[5]):
            return out
        return torch.tanh(out / cap) * cap  # [N, V]

