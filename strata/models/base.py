"""The decoder shared by every supported family (Llama-style pre-norm transformer with HF attribute names).

A family file under models/ subclasses `CausalLM` and sets what differs through its hooks: `config_class`
(the family's config.json keys), `make_attention`, `make_mlp` / `make_expert`, `decoder_layer_class`,
`sanitize` (checkpoint tensor renames) and the class-level switches (q/k norms, biases, MoE block name).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from strata.config import ModelConfig
from strata.layers.attention import AttentionMetadata, paged_attention
from strata.layers.fusion import FusedProjection, fuse_projection
from strata.layers.kv_cache import KVCacheSpec
from strata.layers.linear import Linear
from strata.layers.mlp import MLP
from strata.layers.moe import NATIVE_MAX_TOKENS, SparseMoeBlock
from strata.layers.norm import RMSNorm
from strata.layers.quant_embedding import QuantEmbedding
from strata.layers.rotary import RotaryEmbedding, apply_rotary
from strata.models import native_decode


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, qk_norm: str | None, qkv_bias: bool, o_bias: bool,
                 clip_qkv: float | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = Linear(cfg.hidden_size, q_dim, bias=qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, kv_dim, bias=qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, kv_dim, bias=qkv_bias)
        self.o_proj = Linear(q_dim, cfg.hidden_size, bias=o_bias)
        self.qk_norm = qk_norm
        if qk_norm == "head":  # Qwen3: per-head norm over head_dim
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        elif qk_norm == "full":  # OLMoE: norm over the whole projection
            self.q_norm = RMSNorm(q_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(kv_dim, cfg.rms_norm_eps)
        self.qkv_fused: FusedProjection | None = None  # [H] -> [Hq*D + 2*Hkv*D], set by fuse_projections()
        self.clip_qkv = clip_qkv  # OLMoE: clamp q, k and v to [-clip_qkv, clip_qkv]
        self.sliding_window = cfg.sliding_window if cfg.uses_sliding_window(layer_idx) else None
        self.scale: float | None = None  # None: head_dim ** -0.5
        self.sinks: torch.Tensor | None = None  # [Hq] per-head softmax sink logits (gpt-oss)

    def fuse_projections(self) -> bool:
        self.qkv_fused = fuse_projection([self.q_proj, self.k_proj, self.v_proj])
        return self.qkv_fused is not None

    def forward(self, x, cos, sin, meta: AttentionMetadata, kv_cache) -> torch.Tensor:
        T = x.shape[0]
        if self.qkv_fused is not None:
            qkv = self.qkv_fused(x)  # [T, Hq*D + 2*Hkv*D]
            q, k, v = qkv.split([self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [T, Hq*D], [T, Hkv*D], [T, Hkv*D]
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(T, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = paged_attention(q, k, v, kv_cache, meta, self.sliding_window, self.sinks, self.scale)  # [T, Hq, D]
        return self.o_proj(o.reshape(T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, family: type[CausalLM]):
        super().__init__()
        self.self_attn = family.make_attention(cfg, layer_idx)
        setattr(self, family.mlp_name, family.make_mlp(cfg, layer_idx))
        self.mlp_name = family.mlp_name
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, cos, sin, meta, kv_cache):
        """x: the previous layer's MLP output, residual: the stream before it (None at layer 0). Returns the same
        pair for the next layer; each norm does the residual add before it (one fused op per norm)."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos, sin, meta, kv_cache)
        h, residual = self.post_attention_layernorm(h, residual)
        return getattr(self, self.mlp_name)(h), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, family: type[CausalLM]):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([family.decoder_layer_class(cfg, i, family) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """Base of every family. Subclasses override the class-level switches and hooks below."""

    config_class: ClassVar[type[ModelConfig]] = ModelConfig  # built by registry.config_from_dict via from_hf
    decoder_layer_class: ClassVar[type[nn.Module]] = DecoderLayer  # (cfg, layer_idx, family) -> block
    qk_norm: str | None = None  # None, "head" (Qwen3) or "full" (OLMoE)
    mlp_name = "mlp"  # Mixtral: "block_sparse_moe"
    cast_routing_weights = True  # False: MoE routing weights stay float32 when scaling experts (Mixtral)
    use_native_decoder = True  # False where the layers' forwards must run (tensor parallel: their all-reduces)
    supports_tensor_parallel = True  # False: strata/distributed has no split for the family's layers
    own_quant_methods: tuple[str, ...] = ()  # quantization_config.quant_method values the family's modules read
    keep_float32: tuple[str, ...] = ()  # name suffixes of tensors loaded as float32 whatever --dtype says

    @classmethod
    def sanitize(cls, name: str) -> str | None:
        """The model's name for checkpoint tensor `name`, or None to drop it (default: the same name; the
        rotary tables some checkpoints carry hold no learned state)."""
        return None if name.endswith("rotary_emb.inv_freq") else name

    @classmethod
    def make_attention(cls, cfg: ModelConfig, layer_idx: int) -> nn.Module:
        return Attention(cfg, layer_idx, cls.qk_norm, cls.qkv_bias(cfg), cls.o_bias(cfg))

    @staticmethod
    def qkv_bias(cfg: ModelConfig) -> bool:
        return cfg.attention_bias

    @staticmethod
    def o_bias(cfg: ModelConfig) -> bool:
        return cfg.attention_bias

    @classmethod
    def kv_cache_spec_for(cls, cfg: ModelConfig) -> list[KVCacheSpec]:
        """What each layer caches per token (strata/layers/kv_cache.py); families with another cache override it."""
        return [KVCacheSpec.standard(cfg.num_key_value_heads, cfg.head_dim,
                                     cfg.sliding_window if cfg.uses_sliding_window(i) else None)
                for i in range(cfg.num_hidden_layers)]

    def kv_cache_spec(self) -> list[KVCacheSpec]:
        return self.kv_cache_spec_for(self.config)

    @classmethod
    def make_expert(cls, cfg: ModelConfig) -> nn.Module:
        return MLP(cfg.hidden_size, cfg.moe_intermediate_size)

    @classmethod
    def make_mlp(cls, cfg: ModelConfig, layer_idx: int) -> nn.Module:
        if cfg.is_moe_layer(layer_idx):
            return SparseMoeBlock(cfg, layer_idx, lambda: cls.make_expert(cfg), cast_weights=cls.cast_routing_weights)
        return MLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, type(self))
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = None  # built by post_load(), after the weights leave the meta device

    def post_load(self) -> None:
        """Tie embeddings and build the rotary tables (call after loading weights)."""
        if self.config.tie_word_embeddings:
            embed = self.model.embed_tokens
            if isinstance(embed, QuantEmbedding):  # the head reads the table's blocks (a QuantLinear, no copy)
                self.lm_head = embed.tied_head()
            else:
                self.lm_head.weight = embed.weight
        self.rotary = RotaryEmbedding(self.config)

    def _native_decoder(self, kv_caches):
        """The NativeDecoder for these caches, built on first use (None where the model does not qualify)."""
        cached = self.__dict__.get("_native_decoder_cache")
        if cached is None or (cached and not cached.serves(kv_caches)):
            # the C decoder implements DecoderLayer with Attention: a family's own block or attention opts out
            shared = all(type(dl) is DecoderLayer and type(dl.self_attn) is Attention for dl in self.model.layers)
            cached = (shared and native_decode.NativeDecoder.build(self, kv_caches)) or False
            self.__dict__["_native_decoder_cache"] = cached  # not a submodule
        return cached if cached and cached.active() else None

    def moe_blocks(self) -> list[SparseMoeBlock]:
        return [m for m in self.modules() if isinstance(m, SparseMoeBlock)]

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, ...]] | None = None,  # per layer, as its KVCacheSpec allocates
        logits_indices: torch.Tensor | None = None,  # [N] rows whose logits are needed; None = all
        return_hidden: bool = False,  # the final-norm hidden states [N, H] instead of logits (embeddings)
        before_native: Callable[[], None] | None = None,  # called once, right before the layers run (see below)
    ) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # [T, H]
        cos, sin = self.rotary(positions, x.dtype)
        native = (self._native_decoder(kv_caches)
                  if self.use_native_decoder and native_decode.usable(x, meta, kv_caches) else None)
        if native is not None and native.dtype == x.dtype and native.accepts(x.shape[0], meta):  # one native call
            # before_native runs inside it, right before the GIL-free native code
            x, residual = native(x, cos, sin, native_decode.per_row(meta), before_native)
            if logits_indices is None and not return_hidden:
                logits = native.logits(x, residual)  # final norm, LM head and float in one call where it can
                if logits is not None:
                    return logits  # [N, V]
        else:
            if before_native is not None:
                before_native()
            if (x.shape[0] <= NATIVE_MAX_TOKENS and kv_caches is not None and meta.context_slots is not None
                    and all(c > q for q, c in zip(meta.query_lens, meta.context_lens))):
                # decode rows, verifications: each row a one-row sequence as in plain decoding (and in the native
                # decoder above), so a verified row's attention rounds as a plain step's does
                meta = native_decode.per_row(meta)
            residual = None
            for i, layer in enumerate(self.model.layers):
                x, residual = layer(x, residual, cos, sin, meta, None if kv_caches is None else kv_caches[i])
        if logits_indices is not None:
            x, residual = x.index_select(0, logits_indices), residual.index_select(0, logits_indices)  # [N, H]
        x = self.model.norm(x) if residual is None else self.model.norm(x, residual)[0]  # None: no layers
        return x if return_hidden else self.lm_head(x).float()  # [N, V]
