"""Sharding rules by HF weight name (Megatron layout) and the all-reduce after each attention and MLP block.

Column parallel (output rows split, dim 0): q_proj, k_proj, v_proj (by heads), gate_proj and up_proj of the
dense MLP, of every expert and of the shared expert (Mixtral: w1, w3). Row parallel (input columns split,
dim 1): o_proj, down_proj (Mixtral: w2); their bias, if any, is kept by rank 0 only so the sum adds it once.
Everything else is replicated: embeddings, norms, routers, lm_head. Each MoE expert is split along its
intermediate dim like a dense MLP (TP inside the experts), so every rank runs every routed expert on its slice
and the block's output is a partial sum: one all-reduce per attention block and one per MLP/MoE block.

The model is built from `shard_config(cfg)` (heads and intermediate sizes divided by N), so the modules,
and the KV cache the runner sizes from the config, hold this rank's heads only.

With expert parallel (expert_parallel.py) the routed experts are not split: each rank loads whole the experts
its placement gives it and leaves the others on the meta device; attention, dense MLPs and shared experts
stay tensor parallel, and the MoE block's one all-reduce sums the ranks' partial outputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from strata.config import ModelConfig
from strata.distributed import expert_parallel, parallel_state
from strata.errors import ConfigError, UnsupportedError
from strata.models.registry import model_class
from strata.quant import kquant
from strata.quant.format import read_quantization_config

COLUMN = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "w1", "w3"}
ROW = {"o_proj", "down_proj", "w2"}
# config fields divided by the number of ranks, each naming what it splits
SPLIT_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size", "moe_intermediate_size",
                "shared_expert_intermediate_size")


def _split_fields(ep: bool) -> tuple[str, ...]:
    return tuple(f for f in SPLIT_FIELDS if not (ep and f == "moe_intermediate_size"))


def check_supported(cfg: ModelConfig, tp_size: int, source: str, ep: bool = False) -> None:
    """Refuse, in one line, what tensor parallel cannot split evenly or does not handle yet."""
    if not model_class(cfg).supports_tensor_parallel:
        raise UnsupportedError(f"{source}: --tensor-parallel-size > 1 does not support {cfg.architecture} yet")
    if ep:
        expert_parallel.check_supported(cfg, tp_size, source)
    for name in _split_fields(ep):
        v = getattr(cfg, name)
        if v % tp_size:
            raise ConfigError(f"{source}: field '{name}' = {v} is not divisible by --tensor-parallel-size {tp_size}")
    formats = read_quantization_config(cfg.raw)
    if formats:
        _check_quantized_rows(shard_config(cfg, tp_size, ep), formats, source, ep)


def _check_quantized_rows(shard_cfg: ModelConfig, formats: dict, source: str, ep: bool) -> None:
    """A row-parallel quantized weight splits along its input dim: each rank's slice must start on a group
    (int4, int8-nested) or super-block (K-quants) boundary, or a group would straddle two ranks."""
    with torch.device("meta"):
        model = model_class(shard_cfg)(shard_cfg)
    for name, fmt in formats.items():
        if shard_dim(name + ".weight", ep) != 1:
            continue
        align = kquant.QK_K if fmt.is_kquant else fmt.group_size or 1
        local_in = model.get_submodule(name).in_features
        if local_in % align:
            raise UnsupportedError(f"{source}: '{name}' ({fmt}) splits into {local_in} input columns per rank, "
                                   f"not a multiple of its {align}-weight groups; use int8 or fp8 (one scale per "
                                   "row) or a smaller --tensor-parallel-size")


def shard_config(cfg: ModelConfig, tp_size: int, ep: bool = False) -> ModelConfig:
    """The config of one rank's shard: head counts and intermediate sizes divided by tp_size (expert parallel:
    the routed experts' size kept)."""
    return dataclasses.replace(cfg, **{name: getattr(cfg, name) // tp_size for name in _split_fields(ep)})


def shard_dim(name: str, ep: bool = False) -> int | None:
    """0 (column parallel), 1 (row parallel) or None (replicated, or a whole expert under expert parallel) for
    an HF tensor name."""
    parts = name.split(".")
    if len(parts) < 2 or not name.startswith("model.layers.") or ep and expert_parallel.expert_of(name):
        return None
    module, kind = parts[-2], parts[-1]
    if module in COLUMN:
        return 0
    if module in ROW:
        return None if kind == "bias" else 1  # weight, or a quantized qweight, scales, zeros
    if module in ("q_norm", "k_norm"):
        return -1  # OLMoE's norm over the whole projection: split like q/k (see ShardedRMSNorm)
    return None


def shard_tensor(name: str, t: torch.Tensor, rank: int, tp_size: int, full_norm: bool,
                 ep: bool = False) -> torch.Tensor:
    """This rank's slice of checkpoint tensor `name` (copied out of the file mapping: only the shard is kept)."""
    if ep and expert_parallel.expert_of(name):
        return t  # a whole expert of this rank
    dim = shard_dim(name)
    if dim == -1:
        dim = 0 if full_norm else None
    if dim is None:
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in ROW and parts[-1] == "bias" and rank != 0:
            return torch.zeros_like(t)  # the all-reduce adds rank 0's bias once
        return t
    if dim == 1 and t.ndim == 1:
        return t  # one scale per output row (int8, fp8): whole on every rank
    size = t.shape[dim] // tp_size
    return t.narrow(dim, rank * size, size).contiguous()


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a projection split across ranks (OLMoE's q/k norm): the mean of squares is all-reduced."""

    def __init__(self, norm: nn.Module, full_dim: int):
        super().__init__()
        self.weight, self.eps, self.full_dim = norm.weight, norm.variance_epsilon, full_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        sq = parallel_state.all_reduce(xf.pow(2).sum(-1, keepdim=True))  # [T, 1] over the full projection
        return self.weight * (xf * torch.rsqrt(sq / self.full_dim + self.eps)).to(x.dtype)


def _all_reduce_output(module, inputs, output):
    return parallel_state.all_reduce(output)


def parallelize(model: nn.Module, tp_size: int, rank: int = 0, placement: torch.Tensor | None = None) -> None:
    """Add the all-reduces to a model built from shard_config (after loading); with a placement, each MoE
    block runs this rank's experts only."""
    if placement is not None:
        expert_parallel.apply(model, placement, rank)
    model.use_native_decoder = False  # the one-call native decode runs all layers without the all-reduces
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.register_forward_hook(_all_reduce_output)
        getattr(layer, layer.mlp_name).register_forward_hook(_all_reduce_output)
        if attn.qk_norm == "full":
            attn.q_norm = ShardedRMSNorm(attn.q_norm, attn.q_proj.out_features * tp_size)
            attn.k_norm = ShardedRMSNorm(attn.k_norm, attn.k_proj.out_features * tp_size)


@dataclasses.dataclass
class Shard:
    """What load_model needs to build rank `rank` of `tp_size` (strata/weights/loader.py)."""

    rank: int
    tp_size: int
    placement: torch.Tensor | None = None  # expert parallel: [L, E] rank of each routed expert
    full_qk_norm: bool = False  # set by config(): q/k norms over the whole projection are split too (OLMoE)

    @property
    def ep(self) -> bool:
        return self.placement is not None

    def config(self, cfg: ModelConfig, source: str) -> ModelConfig:
        check_supported(cfg, self.tp_size, source, self.ep)
        self.full_qk_norm = model_class(cfg).qk_norm == "full"
        return shard_config(cfg, self.tp_size, self.ep)

    def skipper(self, skip: Callable[[str], bool] | None) -> Callable[[str], bool] | None:
        """`skip` extended to the experts another rank holds (they stay on the meta device here)."""
        if not self.ep:
            return skip

        def skip_other_ranks(name: str) -> bool:
            where = expert_parallel.expert_of(name)
            return bool(skip and skip(name)) or where is not None and self.placement[where].item() != self.rank

        return skip_other_ranks

    def tensor(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return shard_tensor(name, t, self.rank, self.tp_size, self.full_qk_norm, self.ep)
