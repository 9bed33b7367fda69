"""Calibration statistics for mixed-precision planning (`strata quantize --mixed --calibrate-data FILE`).

The unquantized model runs over calibration text (never the held-out split) with two kinds of hooks:

- a forward hook on every quantizable nn.Linear accumulates the mean of x_j^2 over the rows that reached it
  (`<module>.input_sq_mean` [in_features]); an expert's linears only see the tokens routed to that expert;
- a router hook on every SparseMoeBlock counts the tokens routed to each expert
  (`<block>.experts.<e>.routing_frequency` [], the share of tokens; it sums to top_k over a layer's experts);
- with second_moments=True, also E[x x^T] per linear (`<module>.input_second_moment` [in, in]), the
  Hessian that `strata quantize --method gptq` needs (in_features^2 floats per linear: small models only).

These are the tensors `strata.weights.quant_plan.load_calibration` reads. The model is loaded unfused so that
q/k/v and gate/up run as their own nn.Linear modules and the hooks see their inputs.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from strata.eval.perplexity import scored_logits, window_spans
from strata.layers.moe import SparseMoeBlock
from strata.models.base import CausalLM
from strata.weights.quantize_checkpoint import is_quantizable


class _Recorder:
    def __init__(self, model: CausalLM, second_moments: bool = False):
        self.sq: dict[str, torch.Tensor] = {}  # module -> sum of x^2 [in]
        self.xtx: dict[str, torch.Tensor] | None = {} if second_moments else None  # module -> sum x x^T
        self.rows: dict[str, int] = {}
        self.routed: dict[str, torch.Tensor] = {}  # block -> tokens per expert [E]
        self.tokens: dict[str, int] = {}
        self.handles = []  # forward-hook handles
        self.router_hooks: list[tuple[SparseMoeBlock, object]] = []
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and is_quantizable(f"{name}.weight", tuple(m.weight.shape)):
                self.handles.append(m.register_forward_hook(self._linear_hook(name)))
            elif isinstance(m, SparseMoeBlock):
                fn = self._router_hook(name)
                m.router_hooks.append(fn)
                self.router_hooks.append((m, fn))

    def _linear_hook(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()  # [N, in]
            self.sq[name] = self.sq.get(name, 0) + (x * x).sum(0)
            if self.xtx is not None:
                self.xtx[name] = self.xtx.get(name, 0) + x.double().T @ x.double()  # [in, in]
            self.rows[name] = self.rows.get(name, 0) + x.shape[0]
        return hook

    def _router_hook(self, name: str):
        def hook(block, x, weights, ids):  # x [T, H], ids [T, k]
            counts = torch.bincount(ids.reshape(-1), minlength=block.num_experts).double()  # [E]
            self.routed[name] = self.routed.get(name, 0) + counts
            self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for block, fn in self.router_hooks:
            block.router_hooks.remove(fn)

    def stats(self) -> dict[str, torch.Tensor]:
        out = {f"{m}.input_sq_mean": (s / self.rows[m]).float() for m, s in self.sq.items()}
        for m, s in (self.xtx or {}).items():
            out[f"{m}.input_second_moment"] = (s / self.rows[m]).float()
        for block, counts in self.routed.items():
            for e, c in enumerate(counts.tolist()):
                out[f"{block}.experts.{e}.routing_frequency"] = torch.tensor(c / self.tokens[block], dtype=torch.float32)
        return out


@torch.inference_mode()
def collect_calibration(model: CausalLM, ids: list[int], context: int = 256, max_tokens: int | None = None,
                        progress: bool = True, second_moments: bool = False) -> dict[str, torch.Tensor]:
    """Run non-overlapping windows of `context` tokens over `ids` (at most max_tokens) and return the stats."""
    ids = ids[:max_tokens] if max_tokens else ids
    recorder = _Recorder(model, second_moments)
    try:
        for begin, end, _ in tqdm(window_spans(len(ids), context, context), desc="calibrating",
                                  disable=not progress, file=sys.stderr, leave=False):
            window = ids[begin:end]
            scored_logits(model, [window], [len(window)])  # only the hooks' side effects matter
    finally:
        recorder.remove()
    return recorder.stats()


def calibrate(model_dir: str | Path, text: str, context: int = 256, max_tokens: int | None = 32768,
              progress: bool = True, second_moments: bool = False) -> dict[str, torch.Tensor]:
    """Load the unquantized model (float32, unfused) from model_dir and collect stats on text."""
    from strata.tokenizer import Tokenizer
    from strata.weights.loader import load_model

    model = load_model(str(model_dir), dtype="float32", progress=progress, fuse=False)
    ids = Tokenizer(str(model_dir)).encode(text)
    return collect_calibration(model, ids, context, max_tokens, progress, second_moments)


def save_calibration(stats: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write the stats as safetensors (temporary file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in stats.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
