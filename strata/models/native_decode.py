"""Decode of a few rows (one token each) through a whole decoder in one native call (cpu_decoder.c).

Used by CausalLM.forward for a forward of few rows over the paged KV cache: decode steps (one token per
sequence), speculative verifications (1 + k rows of one sequence) and, in MoE models, prompts. `per_row`
turns every row into a sequence of its own whose context ends at that row's position; the C code writes all
rows' K/V before it attends, so row j sees the rows before it and not after, as a causal forward would. Row
limits (`accepts`): dense models up to 8 rows when every projection is bf16 (one pass of gemv_bf16, or the GEMM
for weights over 1 MiB), else 4 (the quantized GEMVs: once per 4), float32 ones up to MAX_ROWS_F32, decode and
verification only; models with MoE layers up to NATIVE_MAX_TOKENS rows (more in small ones, PROMPT_WORK),
prompts included, whose experts run grouped by expert (each weight read from memory once per step). Every
layer must qualify: no biases or sliding
window; q/k norms per head (Qwen3) or over the projection (OLMoE) and clip_qkv allowed; a dense gated MLP with
fused gate/up, or a MoE block without shared experts whose resident experts have a native plan
(moe_native.py) and no tier provider, routing hook or override; fused q/k/v (bf16, or quantized with the
native kernels); bf16 norms and caches. Each decode step runs the same kernels as the per-op path, so outputs
match it; what goes away is the Python work between kernels. A float32 model kept quantized (a GGUF file at its
default dtype) runs decode_layers_f32 instead: every projection quantized, float32 norms, routers and caches;
its norms, rotary and attention are native float32 code where the per-op path runs torch's, so the two agree to
float32 rounding rather than bit for bit. A prompt's rows attend one by one from the cache
(the decode attention) where the per-op path calls SDPA: the same sums in another order. Anything else keeps the
per-op path.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Callable

import torch
from torch import nn

from strata.layers.attention import AttentionMetadata
from strata.layers.fusion import WEIGHT_KINDS, native_weight
from strata.layers.linear import Linear, bf16_lib, native_rows
from strata.layers.mlp import MLP
from strata.layers.moe import NATIVE_MAX_TOKENS, SparseMoeBlock
from strata.layers.norm import RMSNorm
from strata.layers.quant_linear import F32_GEMV_MAX_ROWS

_P = ctypes.c_void_p
MAX_ROWS = 4  # the quantized GEMVs read each weight once per group of 4 rows (quant_cpu.h, MB)
MAX_ROWS_BF16 = 8  # bf16 projections (gemv_once, as linear.py): gemv_bf16 for weights <= 1 MiB, else the GEMM
MAX_ROWS_F32 = F32_GEMV_MAX_ROWS  # float32 models: GGUF's blocks on their float32 GEMV, as QuantLinear runs them
# MoE models take steps of more than NATIVE_MAX_TOKENS rows (prompts) while rows x multiply-adds per token stay
# under this: the per-op path's Python and torch calls per layer, and SDPA with few small heads, then cost more than
# oneDNN's faster GEMMs save. The bundled model (about 2M multiply-adds a token) ran prompts of 100-400 tokens
# 1.5-1.6x faster in the one call and a step of 2,000 rows 1.4x; OLMoE-sized models (over 1G) keep 64 rows.
PROMPT_WORK = 2048 * 2**21


class _Proj(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int64), ("group", ctypes.c_int64), ("w", _P), ("s", _P), ("z", _P)]


class _Moe(ctypes.Structure):
    _fields_ = [("router", _P), *((n, ctypes.c_int64) for n in ("num_experts", "top_k", "norm_topk",
                "cast_weights", "kind", "group", "inter")), *((n, _P) for n in ("wgu", "sgu", "zgu", "wd", "sd", "zd"))]


class _Layer(ctypes.Structure):
    _fields_ = [("ln1", _P), ("ln2", _P), ("qkv", _Proj), ("o", _Proj), ("gate_up", _Proj), ("down", _Proj),
                ("k", _Proj), ("v", _Proj), ("up", _Proj),  # set when q/k/v (gate/up) are of different kinds
                ("k_cache", _P), ("v_cache", _P), ("qk_norm", ctypes.c_int64), ("q_norm", _P), ("k_norm", _P),
                ("clip", ctypes.c_double), ("moe", ctypes.POINTER(_Moe))]


def _moe(block: SparseMoeBlock, dtype: torch.dtype) -> _Moe | None:
    if block.shared_expert is not None or block.top_k > 64 or block.gate.bias is not None:
        return None
    router = getattr(block.gate, "weight", None)  # None: a quantized router, which the C router does not read
    native = block._native_experts()
    if native is None or router is None or router.dtype != dtype or not router.is_contiguous():
        return None
    return _Moe(router.data_ptr(), block.num_experts, block.top_k, int(bool(block.norm_topk_prob)),
                int(block.cast_weights), native.kind, native.group, native.inter,
                *(ctypes.cast(t, _P) for t in native.tables))


def _proj(module) -> _Proj | None:
    w = native_weight(module)
    return None if w is None else _Proj(*w)


def _fused_or_split(fused, parts: list[nn.Module], rest: int = 2) -> tuple[_Proj | None, list[_Proj | None]]:
    """(first, [the others]) as the C decoder's layer holds them: the fused projection and `rest` empty slots when
    the parts fused; else each part on its own (the decoder runs a set slot apart). None where no native kernel."""
    if fused is not None:
        return _proj(fused), [_Proj() for _ in range(rest)]
    projs = [_proj(p) for p in parts]
    return projs[0], projs[1:]


def _macs_per_token(cfg, moes: list[_Moe], num_layers: int) -> int:
    """Multiply-adds of one token through the layers' projections and routed experts (attention scores aside)."""
    h, d = cfg.hidden_size, cfg.head_dim
    attention = h * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)  # q, k, v, o
    experts = sum(m.top_k * 3 * h * m.inter + h * m.num_experts for m in moes)
    dense = (num_layers - len(moes)) * 3 * h * cfg.intermediate_size
    return max(num_layers * attention + experts + dense, 1)


def _norm_ok(n: nn.Module, dtype: torch.dtype) -> bool:
    return type(n) is RMSNorm and n.weight.dtype == dtype and n.weight.is_contiguous()


class NativeDecoder:
    def __init__(self, model: nn.Module, layers, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], moes: list,
                 dtype: torch.dtype = torch.bfloat16):
        self.model = model  # model keeps every weight behind the pointers alive
        # the caches are the caller's: weak references say whether these very tensors are still the ones in use
        # (a new cache allocated at a freed one's address must not reuse pointers into the other freed caches)
        self.kv_refs = [weakref.ref(t) for pair in kv_caches for t in pair]
        self.moes = moes  # (block, _Moe): keeps the structs alive; blocks are checked for hooks on every call
        bf16 = all(p.kind == WEIGHT_KINDS["bf16"] for la in layers
                   for p in (la.qkv, la.o, la.gate_up, la.down, la.k, la.v, la.up) if p.w)
        self.dtype = dtype  # of the activations, norms and caches: bf16 (decode_layers) or float32 (decode_layers_f32)
        self.max_rows = MAX_ROWS_F32 if dtype == torch.float32 else MAX_ROWS_BF16 if bf16 else MAX_ROWS
        self.layers = (_Layer * len(layers))(*layers)
        cfg = model.config
        self.max_moe_rows = max(NATIVE_MAX_TOKENS, PROMPT_WORK // _macs_per_token(cfg, [m for _, m in moes],
                                                                                  len(layers)))
        self.dims = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                     cfg.intermediate_size)
        self.eps = model.model.layers[0].input_layernorm.variance_epsilon
        self.scale = cfg.head_dim**-0.5

    @classmethod
    def build(cls, model: nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> NativeDecoder | None:
        if bf16_lib() is None or any(len(c) != 2 or c[0].device.type != "cpu" for c in kv_caches):  # K and V
            return None
        if any(p.device.type != "cpu" for p in model.parameters()) or any(
                b.device.type != "cpu" for b in model.buffers()):
            return None
        cfg, layers = model.config, []
        eps = {dl.input_layernorm.variance_epsilon for dl in model.model.layers}
        eps |= {dl.post_attention_layernorm.variance_epsilon for dl in model.model.layers}
        if len(eps) != 1 or cfg.head_dim > 256:
            return None
        dtype = kv_caches[0][0].dtype if kv_caches else None
        if dtype not in (torch.bfloat16, torch.float32):
            return None
        moes = []
        for dl, (kc, vc) in zip(model.model.layers, kv_caches):
            attn, mlp = dl.self_attn, getattr(dl, dl.mlp_name)
            if attn.sliding_window is not None or not (_norm_ok(dl.input_layernorm, dtype)
                                                       and _norm_ok(dl.post_attention_layernorm, dtype)):
                return None
            if not (kc.dtype == vc.dtype == dtype and kc.is_contiguous() and vc.is_contiguous()):
                return None
            qk = {None: 0, "head": 1, "full": 2}[attn.qk_norm]
            if qk and not (_norm_ok(attn.q_norm, dtype) and _norm_ok(attn.k_norm, dtype)
                           and attn.q_norm.variance_epsilon in eps):
                return None
            # one fused q/k/v GEMV, or three where their kinds differ (llama.cpp's Q4_K_M: attn_v in another type)
            qkv, kv = _fused_or_split(attn.qkv_fused, [attn.q_proj, attn.k_proj, attn.v_proj])
            projs = [qkv, _proj(attn.o_proj)]  # None for biases, unfused or other dtypes
            up = [_Proj()]
            moe = None
            if type(mlp) is SparseMoeBlock:
                moe = _moe(mlp, dtype)
                if moe is None:
                    return None
                moes.append((mlp, moe))
                projs += [_Proj(), _Proj()]
            elif type(mlp) is MLP and mlp.gate_proj.out_features == cfg.intermediate_size:
                gate_up, up = _fused_or_split(mlp.gate_up_fused, [mlp.gate_proj, mlp.up_proj], 1)
                projs += [gate_up, _proj(mlp.down_proj)]
            else:
                return None
            if any(p is None for p in [*projs, *kv, *up]):
                return None
            if dtype == torch.float32 and any(p.w and p.kind == WEIGHT_KINDS["bf16"] for p in [*projs, *kv, *up]):
                return None  # float32 activations: quantized weights only
            layers.append(_Layer(dl.input_layernorm.weight.data_ptr(), dl.post_attention_layernorm.weight.data_ptr(),
                                 *projs, *kv, *up, kc.data_ptr(), vc.data_ptr(), qk,
                                 attn.q_norm.weight.data_ptr() if qk else None,
                                 attn.k_norm.weight.data_ptr() if qk else None,
                                 float(attn.clip_qkv or 0.0), ctypes.pointer(moe) if moe is not None else None))
        return cls(model, layers, kv_caches, moes, dtype)

    def serves(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Whether its cache pointers are exactly these (live) cache tensors."""
        flat = [t for pair in kv_caches for t in pair]
        return len(flat) == len(self.kv_refs) and all(r() is t for r, t in zip(self.kv_refs, flat))

    def active(self) -> bool:
        """False while a tier provider, routing hook or routing override is attached to a MoE block."""
        return not any(b.expert_provider is not None or b.router_hooks or b.routing_override is not None
                       for b, _ in self.moes)

    def accepts(self, num_rows: int, meta: AttentionMetadata) -> bool:
        """Dense models: at most max_rows rows (beyond that the GEMVs read each weight again, where a GEMM reads
        it once), every sequence continuing a cached context. MoE models: up to NATIVE_MAX_TOKENS, as the per-op
        path's MoE blocks: each layer runs its experts grouped by expert and reads every weight from memory once
        per step (gemv_once in cpu_moe.c), prompts included; small ones more (PROMPT_WORK)."""
        if self.moes:
            return num_rows <= self.max_moe_rows
        return num_rows <= self.max_rows and all(c > q for q, c in zip(meta.query_lens, meta.context_lens))

    def logits(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor | None:
        """The forward's tail after __call__ in one native call (decode_logits_bf16 in cpu_decoder.c): final
        norm(x + residual), the LM head, float -> logits [S, V] fp32, the numbers CausalLM's modules give. None
        where the final norm or the head is not the plain bf16 kind that call implements, or for rows that linear()
        hands to torch's matmul (linear.native_rows): the modules run then."""
        tail = self.__dict__.get("_tail")
        if tail is None:
            norm, head = self.model.model.norm, self.model.lm_head
            plain = (type(norm) is RMSNorm and type(head) is Linear and head.bias is None
                     and norm.weight.dtype == head.weight.dtype == torch.bfloat16)
            tail = self._tail = (norm, head) if plain else False
        if not tail or x.dtype != torch.bfloat16 or not native_rows(x.shape[0], *tail[1].weight.shape):
            return None
        norm, head = tail
        w, hw = norm.weight.contiguous(), head.weight.contiguous()  # held: the pointers must outlive the call
        s, hsz, vocab = x.shape[0], x.shape[1], hw.shape[0]
        scratch = torch.empty(s * (2 * hsz + vocab), dtype=torch.bfloat16)  # normed rows, their sum, bf16 logits
        out = torch.empty(s, vocab, dtype=torch.float32)  # [S, V]
        bf16_lib().decode_logits_bf16(x.data_ptr(), residual.data_ptr(), w.data_ptr(), s, hsz, norm.variance_epsilon,
                                      hw.data_ptr(), vocab, scratch.data_ptr(), out.data_ptr())
        return out

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                 before_native: Callable[[], None] | None = None):
        """x [S, H] embedded tokens (self.dtype), one per row -> (last layer's MLP output [S, H], residual [S, H]).
        meta: one row per sequence (see per_row). before_native: called right before the native call, once no
        torch op is left before it (torch ops release the GIL: another thread woken earlier would take it
        there, and this thread would wait for it instead of running the native code beside it)."""
        slots, offsets = meta.flat_context()  # all context slots, each row's token last
        x = x.contiguous().clone()
        residual = torch.empty_like(x)
        cos, sin = cos.contiguous(), sin.contiguous()  # held: the pointers below must outlive the call
        h, hq, hkv, d, inter = self.dims
        args = (self.layers, len(self.layers), x.shape[0], h, hq, hkv, d, inter, self.eps, self.scale,
                cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), offsets.data_ptr(), x.data_ptr(), residual.data_ptr())
        decode_layers = bf16_lib().decode_layers_f32 if self.dtype == torch.float32 else bf16_lib().decode_layers
        if before_native is not None:
            before_native()
        decode_layers(*args)
        return x, residual


def usable(x: torch.Tensor, meta: AttentionMetadata, kv_caches) -> bool:
    """Does this forward qualify for the one-call decode (before asking whether the model does, `accepts`)? A
    bf16 or float32 forward over the paged KV cache."""
    return (kv_caches is not None and x.dtype in (torch.bfloat16, torch.float32) and x.shape[0] >= 1
            and meta.slot_mapping is not None and meta.context_slots is not None)


def per_row(meta: AttentionMetadata) -> AttentionMetadata:
    """The same forward with every row a sequence of its own: row j of a sequence with context length c and q
    new tokens has context length c - q + j + 1 (its own token last). Unchanged when every query is one row."""
    if all(n == 1 for n in meta.query_lens):
        return meta
    lens, ctx = [], []
    for q, c, slots in zip(meta.query_lens, meta.context_lens, meta.context_slots):
        for j in range(q):
            lens.append(c - q + j + 1)
            ctx.append(slots[: c - q + j + 1])
    return AttentionMetadata(list(range(len(lens))), [1] * len(lens), lens, meta.slot_mapping, ctx)
