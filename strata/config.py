"""ModelConfig (what every decoder has, from an HF config.json; families subclass it) and EngineConfig
(the runtime knobs, each field carrying its command-line flag)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from strata.errors import ConfigError


def read_config_json(path: str | os.PathLike) -> tuple[str, dict]:
    """(file, parsed JSON) of a model folder's config.json or a config.json path; one-line errors."""
    cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else str(path)
    if not os.path.exists(cfg_path):
        raise ConfigError(f"{cfg_path}: file not found (expected an HF config.json)")
    try:
        with open(cfg_path) as f:
            return cfg_path, json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def hf_config_dict(d: Any, source: str) -> dict:
    """config.json as one flat dict (a multimodal config's text_config merged in); one-line error if not a dict."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
    if "text_config" in d and "hidden_size" not in d:
        return {**d, **d["text_config"]}
    return dict(d)


def hf_architecture(d: dict, source: str) -> str:
    """The first entry of config.json's 'architectures' (the class that strata.models.registry looks up)."""
    archs = d.get("architectures") or []
    if not archs or not isinstance(archs, list):
        raise ConfigError(f"{source}: field 'architectures' must be a non-empty list, got {archs!r}")
    return archs[0]


class HFFields:
    """Reads and checks config.json fields; each error is one line naming the file and the field."""

    def __init__(self, d: dict, source: str):
        self.d, self.source = d, source

    def get(self, name: str, default: Any = None) -> Any:
        v = self.d.get(name)
        return default if v is None else v

    def need(self, name: str, kind=int, positive=True):
        d, source = self.d, self.source
        if name not in d or d[name] is None:
            raise ConfigError(f"{source}: missing field '{name}' (expected {kind.__name__})")
        v = d[name]
        if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
            raise ConfigError(f"{source}: field '{name}' must be an integer, got {v!r}")
        if kind is float and not isinstance(v, (int, float)):
            raise ConfigError(f"{source}: field '{name}' must be a number, got {v!r}")
        if positive and v <= 0:
            raise ConfigError(f"{source}: field '{name}' must be > 0, got {v!r}")
        return v

    def flag(self, name: str, default: bool) -> bool:
        v = self.d.get(name, default)
        if v is None:
            return default
        if not isinstance(v, bool):  # bool("false") is True: a string here is a mistake, not a yes
            raise ConfigError(f"{self.source}: field '{name}' must be true or false, got {v!r}")
        return v

    def number(self, name: str, default: float, ok, what: str, value=None) -> float:
        v = self.d.get(name) if value is None else value
        v = default if v is None else v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
            raise ConfigError(f"{self.source}: field '{name}' must be {what}, got {v!r}")
        return float(v)


@dataclass
class ModelConfig:
    """What every decoder of Strata has, with HF field names: the shared base of the families' configs.

    A family file under strata/models/ subclasses it (its `config_class`), adds the config.json keys it
    declares and overrides the per-layer rules below; `strata.models.registry.config_from_dict` /
    `load_config` pick the family's class from config.json's "architectures" and call its `from_hf`.
    """

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # rope_type in {"linear", "llama3", "yarn"} plus its factors
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    torch_dtype: str = "float32"
    # MoE (num_experts == 0 means dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    # token ids
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    raw: dict = field(default_factory=dict, repr=False)
    source: str = "config.json"

    # class-level facts a family config sets
    attention_bias_default: ClassVar[bool] = False  # Qwen2: q/k/v biases unless the config says otherwise
    needs_experts: ClassVar[bool] = False  # MoE families: refuse a config without experts

    # ---- derived facts (families override the per-layer rules) ---------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` has a sparse MoE block (default: every layer of an MoE model)."""
        return self.is_moe

    def uses_sliding_window(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` attends within `sliding_window` (default: every layer, when it is set)."""
        return bool(self.sliding_window)

    def attention_param_count(self) -> int:
        """Parameters of one layer's attention (projections and biases; families add their q/k norms)."""
        h = self.hidden_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        n = h * q + 2 * h * kv + q * h
        return n + (q + 2 * kv if self.attention_bias else 0)

    @property
    def expert_param_count(self) -> int:
        """Parameters of one routed expert (gate, up, down)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    def param_counts(self) -> dict[str, int]:
        """Total and active (per token) parameter counts."""
        h, L = self.hidden_size, self.num_hidden_layers
        attn = self.attention_param_count()
        dense_mlp = 3 * h * self.intermediate_size
        total = active = 0
        expert_total = 0
        for i in range(L):
            layer = attn + 2 * h
            if self.is_moe_layer(i):
                router = self.num_experts * h
                shared = 3 * h * self.shared_expert_intermediate_size
                if self.shared_expert_intermediate_size:
                    shared += h
                experts = self.num_experts * self.expert_param_count
                expert_total += experts
                total += layer + router + shared + experts
                active += layer + router + shared + self.num_experts_per_tok * self.expert_param_count
            else:
                total += layer + dense_mlp
                active += layer + dense_mlp
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        total += embed + head + h
        active += embed + head + h
        return {"total": total, "active": active, "experts": expert_total, "non_expert": total - expert_total}

    # ---- parsing -------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a parsed config.json: the fields of `hf_fields`, then the checks of `validate`."""
        d = hf_config_dict(d, source)
        cfg = cls(**cls.hf_fields(HFFields(d, source)), raw=d, source=source)
        cfg.validate()
        return cfg

    @classmethod
    def hf_fields(cls, f: HFFields) -> dict[str, Any]:
        """The dataclass fields read from config.json; a family extends the dict with its own keys."""
        d, source = f.d, f.source
        arch = hf_architecture(d, source)
        hidden = f.need("hidden_size")
        heads = f.need("num_attention_heads")
        kv_heads = d.get("num_key_value_heads") or heads
        if not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
            raise ConfigError(
                f"{source}: field 'num_key_value_heads' must divide num_attention_heads={heads}, got {kv_heads!r}"
            )
        head_dim = d.get("head_dim") or hidden // heads
        if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
            raise ConfigError(f"{source}: field 'head_dim' must be a positive even integer, got {head_dim!r}")

        rope = d.get("rope_parameters") or {}
        rope_theta = d.get("rope_theta")
        rope_theta = rope.get("rope_theta", 10000.0) if rope_theta is None else rope_theta
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            scaling = dict(scaling)
            rtype = scaling.get("rope_type", scaling.get("type", "default"))
            if rtype not in ("default", "linear", "llama3", "yarn"):
                raise ConfigError(
                    f"{source}: field 'rope_scaling.rope_type' must be one of default, linear, llama3, yarn; "
                    f"got {rtype!r}"
                )
            scaling["rope_type"] = rtype
            if rtype == "default":
                scaling = None

        eos = d.get("eos_token_id")
        eos_list = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        num_experts = d.get("num_local_experts") or d.get("num_experts") or 0
        moe_inter = d.get("moe_intermediate_size") or (d.get("intermediate_size") if num_experts else 0)
        if cls.needs_experts:
            if not num_experts:
                raise ConfigError(f"{source}: MoE architecture {arch} needs 'num_experts' or 'num_local_experts' > 0")
            f.need("num_experts_per_tok")
            if d["num_experts_per_tok"] > num_experts:
                raise ConfigError(
                    f"{source}: field 'num_experts_per_tok' must be <= number of experts ({num_experts}), "
                    f"got {d['num_experts_per_tok']}"
                )
        sw = d.get("sliding_window")
        return {
            "architecture": arch,
            "model_type": d.get("model_type", ""),
            "vocab_size": f.need("vocab_size"),
            "hidden_size": hidden,
            "intermediate_size": d.get("intermediate_size") or 0,
            "num_hidden_layers": f.need("num_hidden_layers"),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "rms_norm_eps": f.number("rms_norm_eps", 1e-6, lambda v: 0 < v < 1, "a number in (0, 1)"),
            "rope_theta": f.number("rope_theta", 10000.0, lambda v: v > 0, "a number > 0", rope_theta),
            "rope_scaling": scaling,
            "max_position_embeddings": f.need("max_position_embeddings") if "max_position_embeddings" in d else 2048,
            "tie_word_embeddings": f.flag("tie_word_embeddings", False),
            "attention_bias": f.flag("attention_bias", cls.attention_bias_default),
            "mlp_bias": f.flag("mlp_bias", False),
            "sliding_window": int(sw) if isinstance(sw, int) and sw > 0 else None,
            "torch_dtype": str(d.get("torch_dtype") or d.get("dtype") or "float32"),
            "num_experts": int(num_experts),
            "num_experts_per_tok": int(d.get("num_experts_per_tok") or 0),
            "moe_intermediate_size": int(moe_inter or 0),
            "shared_expert_intermediate_size": int(d.get("shared_expert_intermediate_size") or 0),
            "norm_topk_prob": f.flag("norm_topk_prob", False),
            "bos_token_id": d.get("bos_token_id"),
            "eos_token_id": eos_list,
            "pad_token_id": d.get("pad_token_id"),
        }

    def validate(self) -> None:
        """Checks across fields, after parsing (one line naming the file and the field)."""
        if not self.is_moe and self.intermediate_size <= 0:
            raise ConfigError(f"{self.source}: field 'intermediate_size' must be > 0 for {self.architecture}, "
                              f"got {self.intermediate_size!r}")
        if self.torch_dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(
                f"{self.source}: field 'torch_dtype' must be float32, float16 or bfloat16, got {self.torch_dtype!r}"
            )

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("raw")
        return out


ENGINE_DTYPES = ("auto", "float32", "bfloat16", "float16")  # --dtype's values (auto = the checkpoint's)


def knob(default: Any, help: str, type: Any = None, choices: Any = None) -> Any:
    """A dataclass field that carries its command-line flag: help text, value type (int, float, "size"
    for byte sizes read by strata.units, None = str) and choices (a tuple, or "module:NAME" naming the tuple
    in the package that owns the names, so that this module imports nothing above it).
    strata/commands/engine_args.py makes the flags."""
    return field(default=default, metadata={"help": help, "type": type, "choices": choices})


@dataclass
class EngineConfig:
    """Runtime knobs of the engine (one place: every command's engine flags are generated from these fields)."""

    model: str | None = knob(None, "HF model folder or GGUF file (default: the bundled Shakespeare MoE)")
    tokenizer: str | None = knob(None, "folder with tokenizer.json and tokenizer_config.json "
                                       "(default: the model folder)")
    seed: int | None = knob(None, "seed for the sampling of requests without a seed of their own "
                                  "(reproducible runs)", type=int)
    dtype: str = knob("auto", "compute dtype: auto (the checkpoint's torch_dtype), float32, bfloat16, float16",
                      choices=ENGINE_DTYPES)
    max_model_len: int | None = knob(None, "maximum tokens per sequence (default: config's "
                                           "max_position_embeddings, at most 4096; beyond it only with "
                                           "rope_scaling in config.json)", type=int)
    max_num_seqs: int = knob(16, "sequences decoded together", type=int)
    max_num_batched_tokens: int = knob(2048, "token budget of one engine step (longer prompts are prefilled "
                                             "in chunks)", type=int)
    max_tpot_ms: float | None = knob(None, "TPOT target: fewer sequences decode together when the measured "
                                           "decode step time at more would exceed this many milliseconds; the "
                                           "other requests wait in the queue (default: no target)", type=float)
    block_size: int = knob(16, "tokens per KV-cache block", type=int)
    kv_cache_memory: int = knob(512 * 2**20, "bytes for the KV cache, e.g. 512MiB", type="size")
    enable_prefix_caching: bool = knob(True, "share KV blocks between prompts with a common prefix")
    num_threads: int | None = knob(None, "torch CPU threads (default: torch's choice; at most 2 for models under "
                                         "20M parameters)", type=int)
    memory_budget: int | None = knob(None, "total memory budget, e.g. 3GiB; MoE experts beyond it are served "
                                           "from disk (tiered experts engage when the model exceeds it)",
                                     type="size")
    expert_cache_policy: str = knob("nextuse", "expert cache eviction policy",
                                    choices="strata.tiers.policies:ONLINE_POLICIES")
    prefetch: str = knob("none", "expert prefetcher (lookahead: the next layer's router on this layer's "
                                 "hidden state)", choices="strata.tiers.provider:PREFETCH_CHOICES")
    miss_fallback: str = knob("none", "on an expert cache miss: none (wait for the read; exact), renormalize "
                                      "(skip the expert, rescale the others' weights), lowbit (run a resident "
                                      "int4 copy); see docs/tiers.md",
                              choices="strata.tiers.provider:FALLBACKS")
    record_routing: str | None = knob(None, "write routing decisions as JSONL to this file")
    replay_routing: str | None = knob(None, "force routing from this JSONL trace")
    quantized_activations: str = knob("none", "int8: quantized linear layers quantize their input rows to int8 "
                                              "(blocks of 32, one float scale each) and use integer dot products "
                                              "(AVX-512 VNNI) for prompts and batches of more than 4 rows; decode "
                                              "keeps bf16 activations; see docs/quantization.md",
                                      choices=("none", "int8"))
    check_weights: bool = knob(True, "refuse weights holding NaN or inf at load (--no-check-weights skips "
                                     "the pass)")
    # speculative decoding (vLLM's keys): a JSON string or a dict
    speculative_config: str | dict | None = knob(  # noqa: RUF009 (knob is dataclasses.field)
        None, 'speculative decoding as JSON (vLLM keys): \'{"model": DRAFT, "num_speculative_tokens": 4}\' '
              'or \'{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}\'; '
              'see docs/speculative.md')
    tensor_parallel_size: int = knob(1, "split the model over N ranks (attention heads and MLP columns, Megatron "
                                        "layout; float32/bf16 safetensors checkpoints); see docs/distributed.md",
                                     type=int)
    enable_expert_parallel: bool = knob(False, "with --tensor-parallel-size N: partition each MoE layer's routed "
                                               "experts over the N ranks instead of splitting every expert")
    expert_placement_trace: str | None = knob(None, "expert parallel: place co-activated experts on the same rank "
                                                    "from this --record-routing trace (default: contiguous "
                                                    "blocks of experts per rank)")
    distributed_executor_backend: str | None = knob(None, "how the tensor-parallel ranks start: mp (local "
                                                          "processes, one torch thread each unless --num-threads; "
                                                          "the default for --tensor-parallel-size > 1) or ray "
                                                          "(Ray actors; the cluster in RAY_ADDRESS, else a local "
                                                          "one)", choices=("mp", "ray"))

    def __post_init__(self):
        """Nonsensical knobs are refused here (one line naming the flag) instead of hanging the engine."""

        def check(name: str, ok, what: str):
            v = getattr(self, name)
            if not ok(v):
                raise ConfigError(f"--{name.replace('_', '-')} must be {what}, got {v!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        check("max_num_seqs", lambda v: is_int(v) and v >= 1, "an integer >= 1")
        check("max_num_batched_tokens", lambda v: is_int(v) and v >= 1, "an integer >= 1")
        check("max_tpot_ms", lambda v: v is None or isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
              "a positive number of milliseconds (or unset)")
        check("block_size", lambda v: is_int(v) and 1 <= v <= 4096, "an integer in [1, 4096]")
        check("kv_cache_memory", lambda v: is_int(v) and v >= 1, "a positive number of bytes")
        check("max_model_len", lambda v: v is None or is_int(v) and v >= 1, "an integer >= 1 (or unset)")
        check("num_threads", lambda v: v is None or is_int(v) and v >= 1, "an integer >= 1 (or unset)")
        check("memory_budget", lambda v: v is None or is_int(v) and v >= 1, "a positive number of bytes (or unset)")
        check("dtype", lambda v: not isinstance(v, str) or v in ENGINE_DTYPES, "one of " + ", ".join(ENGINE_DTYPES))
        check("tensor_parallel_size", lambda v: is_int(v) and v >= 1, "an integer >= 1")
        check("distributed_executor_backend", lambda v: v in (None, "mp", "ray"), "mp or ray (or unset)")
        check("enable_prefix_caching", lambda v: isinstance(v, bool), "true or false")
        check("quantized_activations", lambda v: v in ("none", "int8"), "none or int8")
        if self.enable_expert_parallel and self.tensor_parallel_size < 2:
            raise ConfigError("--enable-expert-parallel needs --tensor-parallel-size >= 2 (the ranks the experts "
                              "are partitioned over)")
        if self.expert_placement_trace and not self.enable_expert_parallel:
            raise ConfigError("--expert-placement-trace needs --enable-expert-parallel")
