"""QuantEmbedding: a token embedding whose table stays in a quantized format of strata/quant/format.py.

A lookup reads rows, so the table never needs to exist in float: each call gathers the looked-up rows'
stored tensors (every format keeps one row of codes and scales per token, `[vocab, ...]`) and dequantizes only
those, exactly as dequantize_weight does for the whole table. A GGUF's quantized `token_embd` (SmolLM2's
Q8_0: 30 MB instead of 113 MB of float32; a Llama 3 8B Q4_K_M: 0.3 GB instead of 2.1 GB) stays so in memory.

Tied embeddings: `tied_head()` is a QuantLinear over the same buffers (no copy), so the output projection,
read whole every token, runs the format's kernels on the blocks the lookup reads.
"""

from __future__ import annotations

import torch
from torch import nn

from strata.errors import WeightsError
from strata.layers.quant_linear import QuantLinear
from strata.quant.format import QuantFormat, check_tensors, dequantize_weight


class QuantEmbedding(nn.Module):
    """Rows of a quantized [vocab, hidden] table, dequantized per lookup into `dtype`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: QuantFormat | str,
                 dtype: torch.dtype = torch.bfloat16, scale_by_sqrt_dim: bool = False,
                 device: torch.device | str | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.fmt = QuantFormat.parse(fmt)
        if self.fmt.blocks is not None:
            self.fmt.blocks.check_width(self.fmt.kind, embedding_dim)
        self.dtype = dtype  # what the lookup returns: the model's compute dtype
        self.scale_by_sqrt_dim = scale_by_sqrt_dim  # Gemma 3: rows times sqrt(hidden) rounded to `dtype`
        self.module_name = "embed_tokens"
        for suffix, (shape, dt) in self.fmt.tensor_specs(num_embeddings, embedding_dim).items():
            self.register_buffer(suffix, torch.empty(shape, dtype=dt, device=device))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.fmt}, dtype={self.dtype}"

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {s: getattr(self, s) for s in self.fmt.tensor_specs(1, 1)}

    def post_load(self) -> None:
        if any(t.is_meta for t in self._tensors().values()):
            raise WeightsError(f"{self.module_name}: post_load called before the weights were loaded")
        check_tensors(self._tensors(), self.fmt, self.num_embeddings, self.embedding_dim, self.module_name)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.reshape(-1)  # [T]
        rows = {s: t.index_select(0, ids) for s, t in self._tensors().items()}  # [T, ...] each
        x = dequantize_weight(rows, self.fmt, ids.numel(), self.embedding_dim)  # [T, H] float32, exact
        x = x.to(self.dtype)
        if self.scale_by_sqrt_dim:
            x = x * torch.tensor(self.embedding_dim**0.5, dtype=self.dtype)
        return x.reshape(*input_ids.shape, self.embedding_dim)

    def tied_head(self) -> QuantLinear:
        """The output projection of tied embeddings: a QuantLinear reading this table's buffers, no copy."""
        head = QuantLinear(self.embedding_dim, self.num_embeddings, self.fmt, device="meta")
        head.module_name = "lm_head"
        for suffix, t in self._tensors().items():
            setattr(head, suffix, t)
        head.post_load()
        return head


def swap_embedding(model: nn.Module, fmt: QuantFormat | str, dtype: torch.dtype) -> None:
    """Replace model.model.embed_tokens (an nn.Embedding, possibly on meta) by an empty QuantEmbedding."""
    old = model.model.embed_tokens
    if isinstance(old, QuantEmbedding):
        return
    if not isinstance(old, nn.Embedding):
        raise WeightsError(f"quantization_config.modules: 'model.embed_tokens' is a {type(old).__name__}, "
                           f"expected nn.Embedding")
    new = QuantEmbedding(old.num_embeddings, old.embedding_dim, fmt, dtype,
                         scale_by_sqrt_dim=getattr(old, "scale_by_sqrt_dim", False), device=old.weight.device)
    new.module_name = "model.embed_tokens"
    model.model.embed_tokens = new


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations (and the KV cache) run in: the embedding's output dtype."""
    e = model.model.embed_tokens
    return e.dtype if isinstance(e, QuantEmbedding) else e.weight.dtype
