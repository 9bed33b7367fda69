"""Gated feed-forward: down(act(gate(x)) * up(x)), act = silu (SwiGLU) unless a subclass sets act_fn.
HF names gate_proj/up_proj/down_proj (Mixtral: w1/w3/w2)."""

import torch
import torch.nn.functional as F
from torch import nn

from strata.layers.fusion import FusedProjection, fuse_projection
from strata.layers.linear import Linear


class _GatedMLP(nn.Module):
    """Shared forward of the SwiGLU variants; subclasses name the projections."""

    gate_up_fused: FusedProjection | None = None  # [H] -> [2I], set by fuse_projections()
    act_fn = staticmethod(F.silu)  # of the gate (Gemma 3: gelu-tanh)

    def _projections(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        raise NotImplementedError

    def fuse_projections(self) -> bool:
        gate, up, _ = self._projections()
        self.gate_up_fused = fuse_projection([gate, up])
        return self.gate_up_fused is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self._projections()
        if self.gate_up_fused is not None:
            g, u = self.gate_up_fused(x).split(gate.out_features, dim=-1)  # [N, I] each
            return down(self.act_fn(g) * u)
        return down(self.act_fn(gate(x)) * up(x))


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
