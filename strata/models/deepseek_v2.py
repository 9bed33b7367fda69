"""DeepSeek-V2 / V2-Lite (DeepseekV2ForCausalLM): multi-head latent attention with a compressed cache, and
DeepSeekMoE (routed experts plus always-on shared experts; the first `first_k_dense_replace` layers dense).

- Attention (strata/layers/mla.py): the query comes from q_proj, or through the low-rank q_a_proj ->
  q_a_layernorm -> q_b_proj when q_lora_rank is set; kv_a_proj_with_mqa gives the latent c (kv_lora_rank,
  normed by kv_a_layernorm) and one rotary key k_pe (qk_rope_head_dim) shared by every head. The cache keeps
  only [c, k_pe] per token (`kv_cache_spec_for`). Rotary pairs are interleaved; yarn's mscale_all_dim
  scales the softmax as in DeepSeek's code.
- MoE: strata's SparseMoeBlock (expert dispatch, tiers, quantized experts, native decode kernel) with a
  DeepSeek router `DeepseekGate` (HF names `mlp.gate.weight`, V3's `mlp.gate.e_score_correction_bias`) and
  `mlp.shared_experts`, which are not routed and so stay resident under --memory-budget.
  V2 routing: softmax over the experts, top-k (`greedy`) or top-k within the `topk_group` best of `n_group`
  groups by their best expert (`group_limited_greedy`), times routed_scaling_factor; as in transformers,
  V2 does not renormalise the top-k (every released V2 config has norm_topk_prob false).
  V3 routing (deepseek_v3.py): sigmoid scores, choice by score + e_score_correction_bias within the
  `topk_group` best groups by their two best experts, weights from the unbiased scores, renormalised when
  norm_topk_prob, times routed_scaling_factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from strata.config import HFFields, ModelConfig
from strata.errors import ConfigError
from strata.layers.kv_cache import KVCacheSpec
from strata.layers.linear import Linear
from strata.layers.mla import apply_rotary_interleaved, mla_attention
from strata.layers.mlp import MLP
from strata.layers.moe import SparseMoeBlock
from strata.layers.norm import RMSNorm
from strata.layers.rotary import apply_rotary
from strata.models.base import CausalLM

LORA_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm: DeepSeek's RMSNorm default, not rms_norm_eps


@dataclass
class DeepseekV2Config(ModelConfig):
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_shared_experts: int = 0
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"  # V2: greedy | group_limited_greedy; V3: noaux_tc
    scoring_func: str = "softmax"  # V3: sigmoid
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    rope_interleave: bool = True

    needs_experts = True
    default_scoring: ClassVar[str] = "softmax"  # config.json without scoring_func

    @classmethod
    def hf_fields(cls, f: HFFields) -> dict:
        d = dict(f.d)
        d.setdefault("num_experts", d.get("n_routed_experts"))
        rope = f.need("qk_rope_head_dim")
        d["head_dim"] = rope  # the rotary tables are built for the decoupled key only
        d["num_key_value_heads"] = d.get("num_attention_heads")  # MLA has no KV heads of its own
        fields = super().hf_fields(HFFields(d, f.source))
        moe_inter = fields["moe_intermediate_size"]
        q_lora = f.get("q_lora_rank")
        fields.update(
            q_lora_rank=int(q_lora) if q_lora else None,
            kv_lora_rank=f.need("kv_lora_rank"),
            qk_nope_head_dim=f.need("qk_nope_head_dim"),
            qk_rope_head_dim=rope,
            v_head_dim=f.need("v_head_dim"),
            n_shared_experts=int(f.get("n_shared_experts", 0)),
            shared_expert_intermediate_size=0,  # DeepSeek's shared experts have no sigmoid gate (make_mlp)
            routed_scaling_factor=f.number("routed_scaling_factor", 1.0, lambda v: v > 0, "a number > 0"),
            topk_method=str(f.get("topk_method", "greedy")),
            scoring_func=str(f.get("scoring_func", cls.default_scoring)),
            n_group=int(f.get("n_group", 1)),
            topk_group=int(f.get("topk_group", 1)),
            first_k_dense_replace=int(f.get("first_k_dense_replace", 0)),
            moe_layer_freq=int(f.get("moe_layer_freq", 1)),
            rope_interleave=f.flag("rope_interleave", True),
            moe_intermediate_size=moe_inter,
        )
        return fields

    def validate(self) -> None:
        super().validate()
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ConfigError(f"{self.source}: field 'scoring_func' must be softmax or sigmoid, "
                              f"got {self.scoring_func!r}")
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ConfigError(f"{self.source}: field 'topk_method' must be greedy, group_limited_greedy or "
                              f"noaux_tc, got {self.topk_method!r}")
        if self.n_group < 1 or self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise ConfigError(f"{self.source}: fields 'n_group'/'topk_group' must split n_routed_experts="
                              f"{self.num_experts} into n_group groups and pick 1..n_group of them, got "
                              f"{self.n_group}/{self.topk_group}")

    @property
    def group_limited(self) -> bool:
        return self.n_group > 1 and (self.scoring_func == "sigmoid" or self.topk_method == "group_limited_greedy")

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (self.is_moe and layer_idx >= self.first_k_dense_replace
                and layer_idx % max(self.moe_layer_freq, 1) == 0)

    @property
    def shared_intermediate(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under yarn (DeepSeek's long-context fix)."""
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        s = self.rope_scaling or {}
        factor, m = float(s.get("factor", 1.0)), s.get("mscale_all_dim")
        if m and factor > 1:
            mscale = 0.1 * float(m) * math.log(factor) + 1.0
            scale *= mscale * mscale
        return scale

    def attention_param_count(self) -> int:
        h, nh, r = self.hidden_size, self.num_attention_heads, self.kv_lora_rank
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        q = h * nh * qk if not self.q_lora_rank else h * self.q_lora_rank + self.q_lora_rank * (1 + nh * qk)
        kv = h * (r + self.qk_rope_head_dim) + r + r * nh * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + nh * self.v_head_dim * h

    def param_counts(self) -> dict[str, int]:
        counts = super().param_counts()
        shared = 3 * self.hidden_size * self.shared_intermediate
        shared *= sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))
        counts = {k: v + (shared if k in ("total", "active", "non_expert") else 0) for k, v in counts.items()}
        if self.scoring_func == "sigmoid":  # e_score_correction_bias per MoE layer
            bias = self.num_experts * sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))
            counts = {k: v + (bias if k in ("total", "active", "non_expert") else 0) for k, v in counts.items()}
        return counts


class DeepseekV2Attention(nn.Module):
    def __init__(self, cfg: DeepseekV2Config, layer_idx: int):
        super().__init__()
        h, self.num_heads = cfg.hidden_size, cfg.num_attention_heads
        self.nope, self.rope, self.v_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        q_out = self.num_heads * (self.nope + self.rope)
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(h, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = Linear(cfg.q_lora_rank, q_out, bias=False)
        else:
            self.q_proj = Linear(h, q_out, bias=False)
        self.kv_a_proj_with_mqa = Linear(h, self.kv_lora_rank + self.rope, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LORA_NORM_EPS)
        self.kv_b_proj = Linear(self.kv_lora_rank, self.num_heads * (self.nope + self.v_head_dim), bias=False)
        self.o_proj = Linear(self.num_heads * self.v_head_dim, h, bias=cfg.attention_bias)
        self.scale = cfg.softmax_scale()
        self.rotate = apply_rotary_interleaved if cfg.rope_interleave else apply_rotary
        self.sliding_window = None

    def forward(self, x, cos, sin, meta, kv_cache) -> torch.Tensor:
        T = x.shape[0]
        if hasattr(self, "q_a_proj"):
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # [T, Hq*(N+P)]
        else:
            q = self.q_proj(x)
        q_nope, q_pe = q.view(T, self.num_heads, self.nope + self.rope).split([self.nope, self.rope], dim=-1)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)  # [T, R], [T, P]
        q_pe = self.rotate(q_pe, cos, sin)  # [T, Hq, P]
        k_pe = self.rotate(k_pe[:, None, :], cos, sin)[:, 0]  # [T, P]
        latent = torch.cat((self.kv_a_layernorm(c.contiguous()), k_pe), dim=-1)  # [T, R + P]
        o = mla_attention(q_nope, q_pe, latent, kv_cache, meta, self.kv_b_proj, self.v_head_dim, self.scale)
        return self.o_proj(o.reshape(T, -1))  # o: [T, Hq, V]


class DeepseekGate(nn.Module):
    """The router: logits in float32 from `weight` [E, H], then DeepSeek's top-k (module docstring)."""

    def __init__(self, cfg: DeepseekV2Config):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        if cfg.scoring_func == "sigmoid":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.num_experts))
        self.top_k, self.scoring = cfg.num_experts_per_tok, cfg.scoring_func
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.group_limited, self.norm_topk_prob = cfg.group_limited, cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())  # [T, E]

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [T, E] float32 -> (weights [T, k] float32, expert ids [T, k])."""
        if self.scoring == "sigmoid":
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias.float()  # [T, E]
        else:
            scores = choice = logits.softmax(dim=-1)
        if self.group_limited:
            choice = self._limit_groups(choice)
        if self.scoring == "sigmoid":
            ids = torch.topk(choice, self.top_k, dim=-1)[1]
            weights = scores.gather(1, ids)
            if self.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weights, ids = torch.topk(choice, self.top_k, dim=-1)
        return weights * self.routed_scaling_factor, ids

    def _limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Keep the experts of the topk_group best groups (V2: by their best expert; V3: by their best two)."""
        t, e = choice.shape
        grouped = choice.view(t, self.n_group, e // self.n_group)  # [T, G, E/G]
        if self.scoring == "sigmoid":
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
        else:
            group_scores = grouped.max(dim=-1).values
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, torch.topk(group_scores, self.topk_group, dim=-1)[1], True)  # [T, G]
        fill = float("-inf") if self.scoring == "sigmoid" else 0.0
        return grouped.masked_fill(~keep[..., None], fill).view(t, e)


class DeepseekMoE(SparseMoeBlock):
    """SparseMoeBlock with DeepseekGate as router and unrouted `shared_experts` added to every token."""

    def __init__(self, cfg: DeepseekV2Config, layer_idx: int, expert_factory):
        super().__init__(cfg, layer_idx, expert_factory, cast_weights=False)  # weights stay float32, as HF
        self.gate = DeepseekGate(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.shared_intermediate) if cfg.n_shared_experts else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)  # [T, E] float32
        if self.routing_override is not None:
            return self.routing_override(self, logits)
        return self.gate.select(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out if self.shared_experts is None else out + self.shared_experts(x)


class DeepseekV2ForCausalLM(CausalLM):
    config_class = DeepseekV2Config
    use_native_decoder = False  # the one-call native decoder knows standard attention only
    supports_tensor_parallel = False  # q_b_proj / kv_b_proj / the latent cache have no tensor-parallel split

    @classmethod
    def make_attention(cls, cfg, layer_idx):
        return DeepseekV2Attention(cfg, layer_idx)

    @classmethod
    def make_mlp(cls, cfg, layer_idx):
        if cfg.is_moe_layer(layer_idx):
            return DeepseekMoE(cfg, layer_idx, lambda: cls.make_expert(cfg))
        return MLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)

    @classmethod
    def kv_cache_spec_for(cls, cfg) -> list[KVCacheSpec]:
        """One latent row per token and layer: [c (kv_lora_rank), k_pe (qk_rope_head_dim)], no value."""
        return [KVCacheSpec(k_heads=1, k_dim=cfg.kv_lora_rank + cfg.qk_rope_head_dim)] * cfg.num_hidden_layers
