"""ModelShape: the architecture numbers the performance model needs, from a config.json, a dict or a preset.

Dense, GQA/MQA, MoE (routed + shared experts, first-k dense layers), MLA (DeepSeek-V2/V3), sliding-window
and linear-attention (hybrid) layers. Architectures that strata.models.registry supports are parsed with
it (so validation stays in one place); others (DeepSeek, Gemma 3, GPT-2 style, SmallThinker, Qwen3.5) are read
from the raw dict here, since only their shapes are needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from strata.errors import ConfigError

PRESETS_PATH = Path(__file__).with_name("presets.json")
# model_types whose FFNs (and experts) are plain two-matrix MLPs (up, down), not gated (gate, up, down)
PLAIN_MLP_TYPES = ("gpt2", "gpt_neox", "opt", "gptj", "bloom", "phi", "nllb-moe")


@dataclass
class ModelShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int = 0  # dense FFN width
    ffn_matrices: int = 3  # 3 = gated (SwiGLU), 2 = plain MLP (GPT-2)
    tie_embeddings: bool = False
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate: int = 0
    shared_intermediate: int = 0  # summed over shared experts
    moe_layer: list[bool] = field(default_factory=list)
    # MLA (kv_lora_rank > 0): compressed KV latent of kv_lora_rank + qk_rope_dim per token per layer
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0
    # per-layer attention kind: "full", "sliding" or "linear" (recurrent state, no KV cache)
    attn_kind: list[str] = field(default_factory=list)
    sliding_window: int = 0
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_key_dim: int = 0
    linear_value_dim: int = 0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    def kv_elems_per_token(self, layer: int) -> int:
        """KV-cache elements stored per token for one layer (K and V; MLA stores its latent + rope key)."""
        if self.attn_kind[layer] == "linear":
            return 0
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_dim
        return 2 * self.kv_heads * self.head_dim

    def param_counts(self) -> dict[str, int]:
        """Total / active / routed-expert parameter counts (from the operator list, one source of truth)."""
        from strata.analysis.operators import layer_weights

        total = active = experts = 0
        for i in range(self.layers):
            for w in layer_weights(self, i):
                total += w.params * w.count
                active += w.params * w.active
                if w.routed:
                    experts += w.params * w.count
        emb = self.vocab * self.hidden
        head = 0 if self.tie_embeddings else emb
        total += emb + head
        active += emb + head
        return {"total": total, "active": active, "experts": experts, "non_expert": total - experts}


def _first(d: dict, *names, default=None):
    for n in names:
        if d.get(n) is not None:
            return d[n]
    return default


def shape_from_dict(d: dict, name: str = "config.json") -> ModelShape:
    """Build a ModelShape from an HF config dict (any supported or shape-compatible architecture)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{name}: expected a JSON object, got {type(d).__name__}")
    if "text_config" in d and "hidden_size" not in d:
        d = {**d, **d["text_config"]}
    from strata.models.registry import MODEL_REGISTRY, config_from_dict  # torch: only on this call

    arch = (d.get("architectures") or [""])[0]
    if arch in MODEL_REGISTRY and not d.get("kv_lora_rank"):  # latent attention: the fields read below
        c = config_from_dict(d, source=name)
        shared = c.shared_expert_intermediate_size
        return _finish(d, ModelShape(
            name=name, hidden=c.hidden_size, layers=c.num_hidden_layers, heads=c.num_attention_heads,
            kv_heads=c.num_key_value_heads, head_dim=c.head_dim, vocab=c.vocab_size,
            intermediate=c.intermediate_size, tie_embeddings=c.tie_word_embeddings,
            num_experts=c.num_experts, top_k=c.num_experts_per_tok, moe_intermediate=c.moe_intermediate_size,
            shared_intermediate=shared, moe_layer=[c.is_moe_layer(i) for i in range(c.num_hidden_layers)],
        ))
    hidden = _first(d, "hidden_size", "n_embd", "d_model")
    layers = _first(d, "num_hidden_layers", "n_layer", "n_layers", "decoder_layers", "num_layers")
    heads = _first(d, "num_attention_heads", "n_head", "n_heads", "decoder_attention_heads")
    vocab = _first(d, "vocab_size")
    for key, v in (("hidden_size", hidden), ("num_hidden_layers", layers), ("num_attention_heads", heads),
                   ("vocab_size", vocab)):
        if not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{name}: field '{key}' must be a positive integer, got {v!r}")
    kv_heads = _first(d, "num_key_value_heads", default=heads)
    head_dim = _first(d, "head_dim", default=hidden // heads)
    experts = int(_first(d, "n_routed_experts", "num_local_experts", "num_experts", "moe_num_primary_experts",
                         "moe_num_experts", default=0))
    top_k = int(_first(d, "num_experts_per_tok", "experts_per_token", "moe_num_active_primary_experts", "moe_topk",
                       "moe_top_k", "router_top_k", default=0))
    inter = int(_first(d, "intermediate_size_mlp", "intermediate_size", "ffn_hidden_size", "decoder_ffn_dim",
                       "n_inner", default=0) or 0)
    # Mixtral-style configs (gpt-oss, PhiMoE, Granite MoE, DBRX, Llama 4) size their experts with the FFN width
    moe_inter = int(_first(d, "moe_intermediate_size", "moe_ffn_hidden_size", default=0) or 0)
    if experts and not moe_inter:
        moe_inter = int(_first(d, "intermediate_size", "ffn_hidden_size", "decoder_ffn_dim", default=0) or 0)
    plain = d.get("model_type") in PLAIN_MLP_TYPES or arch.startswith("GPT")
    if not inter:
        inter = 4 * hidden if plain else moe_inter
    shared = int(_first(d, "shared_expert_intermediate_size", default=0) or 0)
    if not shared and d.get("n_shared_experts"):
        shared = int(d["n_shared_experts"]) * moe_inter
    if not shared and str(d.get("model_type", "")).startswith("llama4"):
        shared = moe_inter  # Llama 4: one shared expert of the routed width in every MoE layer
    first_dense = int(d.get("first_k_dense_replace") or 0)
    freq = int(d.get("moe_layer_freq") or 1)
    # every step-th layer is an MoE layer (1-based: Qwen2-MoE decoder_sparse_step, Llama 4, NLLB-MoE)
    step = int(_first(d, "interleave_moe_layer_step", "decoder_sparse_step", default=1) or 1)
    moe_layer = [bool(experts) and i >= first_dense and i % freq == 0 and (i + 1) % step == 0 for i in range(layers)]
    if experts and top_k <= 0:
        raise ConfigError(f"{name}: MoE config with {experts} experts needs 'num_experts_per_tok' > 0")
    return _finish(d, ModelShape(
        name=name, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim, vocab=vocab,
        intermediate=inter, ffn_matrices=2 if plain else 3,
        tie_embeddings=bool(d.get("tie_word_embeddings", plain and d.get("model_type") != "phi")), num_experts=experts, top_k=top_k,
        moe_intermediate=moe_inter, shared_intermediate=shared, moe_layer=moe_layer,
        q_lora_rank=int(d.get("q_lora_rank") or 0), kv_lora_rank=int(d.get("kv_lora_rank") or 0),
        qk_nope_dim=int(d.get("qk_nope_head_dim") or 0), qk_rope_dim=int(d.get("qk_rope_head_dim") or 0),
        v_head_dim=int(d.get("v_head_dim") or 0),
    ))


def _finish(d: dict, s: ModelShape) -> ModelShape:
    """Per-layer attention kinds (sliding / linear), shared by both parsing paths."""
    kinds = ["full"] * s.layers
    types = d.get("layer_types")
    if isinstance(types, list) and len(types) == s.layers:
        kinds = ["linear" if "linear" in t else "sliding" if "sliding" in t else "full" for t in types]
    elif d.get("full_attention_interval"):
        n = int(d["full_attention_interval"])
        kinds = ["full" if (i + 1) % n == 0 else "linear" for i in range(s.layers)]
    elif d.get("sliding_window_pattern") and d.get("sliding_window"):
        n = int(d["sliding_window_pattern"])
        kinds = ["full" if (i + 1) % n == 0 else "sliding" for i in range(s.layers)]
    elif d.get("model_type") == "gemma2" and d.get("sliding_window"):  # Gemma 2 alternates, sliding first
        kinds = ["sliding" if i % 2 == 0 else "full" for i in range(s.layers)]
    elif isinstance(d.get("sliding_window"), int) and d.get("model_type") in ("mistral", "mixtral"):
        kinds = ["sliding"] * s.layers
    s.attn_kind = kinds
    s.sliding_window = int(d.get("sliding_window") or 0) if "sliding" in kinds else 0
    if "linear" in kinds:
        s.linear_key_heads = int(d.get("linear_num_key_heads") or s.heads)
        s.linear_value_heads = int(d.get("linear_num_value_heads") or s.heads)
        s.linear_key_dim = int(d.get("linear_key_head_dim") or s.head_dim)
        s.linear_value_dim = int(d.get("linear_value_head_dim") or s.head_dim)
    if not s.moe_layer:
        s.moe_layer = [False] * s.layers
    return s


def load_presets() -> dict[str, dict]:
    with open(PRESETS_PATH) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def find_preset(name: str) -> str | None:
    """Preset key for a name as the field writes it (models.find_preset: normalisation, org, suffixes)."""
    from strata.analysis.models import find_preset as find

    return find(name)[0]


def load_shape(model: str) -> ModelShape:
    """`model` is a folder with config.json, a config.json path, a .gguf file or a preset name (models.py)."""
    from strata.analysis.models import resolve_model

    return resolve_model(model).shape
