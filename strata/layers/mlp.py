"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)). HF names gate_proj/up_proj/down_proj (Mixtral: w1/w3/w2)."""

import torch
import torch.nn.functional as F
from torch import nn

from strata.layers.fusion import fuse, fuse_quantized
from strata.layers.linear import Linear, linear


class _GatedMLP(nn.Module):
    """Shared forward of the SwiGLU variants; subclasses name the projections."""

    gate_up_weight: torch.Tensor | None = None  # [2I, H] fused gate+up, set by fuse_projections()
    gate_up_quant = None  # QuantLinear over gate+up rows, set by fuse_projections() (not a submodule)

    def _projections(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        raise NotImplementedError

    def fuse_projections(self) -> bool:
        gate, up, _ = self._projections()
        fused = fuse([gate, up])
        if fused is not None:
            self.gate_up_weight = fused[0]
            return True
        # object.__setattr__: its buffers are views of gate's and up's, which keep the state-dict names
        object.__setattr__(self, "gate_up_quant", fuse_quantized([gate, up]))
        return self.gate_up_quant is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self._projections()
        if self.gate_up_weight is not None and gate.bias is None:
            g, u = linear(x, self.gate_up_weight).split(gate.out_features, dim=-1)  # [N, I] each
            return down(F.silu(g) * u)
        if self.gate_up_quant is not None:
            g, u = self.gate_up_quant(x).split(gate.out_features, dim=-1)  # [N, I] each
            return down(F.silu(g) * u)
        return down(F.silu(gate(x)) * up(x))


class MLP(_GatedMLP):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def _projections(self):
        return self.gate_proj, self.up_proj, self.down_proj


class MixtralExpert(_GatedMLP):
    """Mixtral's expert with its checkpoint names: w1 = gate, w3 = up, w2 = down."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w1 = Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = Linear(intermediate_size, hidden_size, bias=False)
        self.w3 = Linear(hidden_size, intermediate_size, bias=False)

    def _projections(self):
        return self.w1, self.w3, self.w2
