"""Rotary position embeddings: inverse frequencies for default/linear/llama3/yarn scaling, applied HF-style
(rotate_half over the two halves of each head)."""

from __future__ import annotations

import math

import torch

from strata.config import ModelConfig
from strata.errors import ConfigError
from strata.layers.linear import bf16_lib


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(cfg: ModelConfig, dim: int, s: dict) -> tuple[torch.Tensor, float]:
    base, factor = cfg.rope_theta, float(s["factor"])
    orig = s.get("original_max_position_embeddings") or cfg.max_position_embeddings

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = s.get("attention_factor")
    if attn is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attn = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attn = mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation_factor = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (1.0 / pos_freqs) * extrapolation_factor
    return inv, float(attn)


def rope_parameters(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [D/2] float32, attention_scaling) for the config's rope type."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling
    if not s:
        return inv_freq, 1.0
    rtype = s["rope_type"]
    try:
        if rtype == "linear":
            return inv_freq / float(s["factor"]), 1.0
        if rtype == "llama3":
            return _llama3(inv_freq, s), 1.0
        if rtype == "yarn":
            return _yarn(cfg, dim, s)
    except KeyError as e:
        raise ConfigError(f"{cfg.source}: rope_scaling of type {rtype!r} is missing field {e.args[0]!r}") from None
    raise ConfigError(f"{cfg.source}: rope_scaling type {rtype!r} is not supported (linear, llama3, yarn)")


class RotaryEmbedding:
    """Computes cos/sin for given positions; kept outside nn.Module state so checkpoints need no buffer.

    The values of positions [0, n) are computed once per dtype into a table (grown by doubling when a position
    beyond it comes), and a step gathers its rows: a decode step's cos/sin cost two gathers instead of eight ops
    (vLLM's cos_sin_cache). Each entry is the same float32 arithmetic whether computed alone or in the table, so
    the rows equal what the per-step computation gave, bit for bit."""

    def __init__(self, cfg: ModelConfig):
        self.inv_freq, self.attention_scaling = rope_parameters(cfg)
        self._tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}  # dtype -> cos, sin [n, D]

    def compute(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, D] of these positions, computed."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)

    def _table(self, needed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        table = self._tables.get(dtype)
        if table is None or table[0].shape[0] < needed:
            n = max(needed, 2 * (0 if table is None else table[0].shape[0]), 256)
            table = self._tables[dtype] = self.compute(torch.arange(n), dtype)  # [n, D] each
        return table

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.numel() == 0:
            cos, sin = self.compute(positions, dtype)
        else:
            cos_table, sin_table = self._table(int(positions.max()) + 1, dtype)
            cos, sin = cos_table[positions], sin_table[positions]  # [T, D]
        return cos[:, None, :], sin[:, None, :]  # [T, 1, D] broadcast over heads


def _native_ok(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    t, h, d = x.shape
    return (
        x.dtype == torch.bfloat16
        and cos.dtype == torch.bfloat16
        and sin.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and d % 2 == 0
        and x.stride(2) == 1
        and (h == 1 or x.stride(1) == d)
        and cos.shape == (t, 1, d)
        and cos.is_contiguous()
        and sin.is_contiguous()
        and not (torch.is_grad_enabled() and x.requires_grad)
        and bf16_lib() is not None
    )


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] -> rotated x, HF's rotate_half convention. bf16 heads (also strided views out of a fused
    q/k/v projection) go through one native call (cpu_rotary.c), with torch's rounding."""
    if x.dim() == 3 and _native_ok(x, cos, sin):
        t, h, d = x.shape
        out = torch.empty(t, h, d, dtype=x.dtype)
        bf16_lib().rope_bf16(x.data_ptr(), t, h, d, x.stride(0), cos.data_ptr(), sin.data_ptr(), out.data_ptr())
        return out
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
