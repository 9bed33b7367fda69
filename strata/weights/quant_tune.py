"""End-to-end tuning of int4 group scales and codes against the float model (`strata quantize --method tune`).

GPTQ (gptq.py) minimises each linear's own output error; it cannot see how errors add up through the model.
This file starts from GPTQ's stored tensors and runs the whole model with every int4 linear replaced by its
fake-quantized weight `(q - z) * s`, then minimises KL(float model || quantized model) of the next-token
distributions on calibration windows, by Adam through straight-through rounding:

- scales: one log-scale per group, rounded to fp16 in the forward (straight through), so what is scored is
  exactly what is stored;
- codes (`rounding="learned"`): a latent float per weight, started at GPTQ's code and rounded (straight
  through) in the forward, so a code moves by one step once its gradient has pushed it past a half;
  `rounding="fixed"` keeps GPTQ's codes and tunes only the scales. Zero points (-asym) stay as GPTQ chose.

Every forward is the hard quantized model, so the loss tracked is the stored model's. The full calibration
KL is measured at the start and every `eval_every` steps; the best state (the start included) is what comes
back, so tuning never returns a higher calibration loss than its start. Only int4 formats are tuned; other
formats' tensors are returned unchanged. The layout does not change: kernels read the same tensors.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from strata.errors import UnsupportedError
from strata.layers.attention import AttentionMetadata
from strata.models.base import CausalLM
from strata.quant.format import QuantFormat, pack_nibbles, unpack_nibbles

ROUNDINGS = ("learned", "fixed")


@dataclass
class TuneConfig:
    steps: int = 600  # Adam steps, each on `batch` windows
    batch: int = 8  # windows per step
    context: int = 128  # tokens per window (non-overlapping windows over the calibration ids)
    lr_scale: float = 1e-3  # Adam step on log-scales
    lr_code: float = 1e-2  # Adam step on latent codes, in code units ("learned" rounding)
    rounding: str = "learned"  # learned | fixed (ROUNDINGS)
    eval_every: int = 100  # steps between full calibration-KL evaluations (best state kept)
    seed: int = 0
    progress: bool = True


class _FakeQuant(torch.nn.Module):
    """One int4 linear's trainable state: latent codes [out, ng, G] and log-scales [out, ng]."""

    def __init__(self, tensors: dict[str, torch.Tensor], fmt: QuantFormat, in_features: int, learn_codes: bool):
        super().__init__()
        s = tensors["scales"].float()  # [out, ng]
        out, ng = s.shape
        codes = unpack_nibbles(tensors["qweight"]).float().view(out, ng, -1)  # [out, ng, G] 0..15
        self.zero = tensors["zeros"].float()[..., None] if fmt.asym else torch.full((out, ng, 1), 8.0)
        self.codes = torch.nn.Parameter(codes, requires_grad=learn_codes)
        self.sign = torch.where(s < 0, -1.0, 1.0)  # symmetric int4 stores negative scales (16-level choice)
        self.dead = s == 0  # an all-zero group keeps scale 0
        self.log_scale = torch.nn.Parameter(torch.where(self.dead, torch.ones_like(s), s.abs()).log())
        self.fmt, self.in_features = fmt, in_features

    def weight(self) -> torch.Tensor:  # [out, in] fp32, the stored model's weight
        q = self.codes + (self.codes.round().clamp(0, 15) - self.codes).detach()  # straight-through round
        s = self.log_scale.exp()
        s = s + (s.half().float() - s).detach()  # fp16 storage, straight through
        s = torch.where(self.dead, torch.zeros_like(s), s * self.sign)
        w = (q - self.zero) * s[..., None]  # [out, ng, G]
        return w.reshape(w.shape[0], -1)[:, : self.in_features]

    @torch.no_grad()
    def clamp_(self) -> None:  # latent codes stay within half a step of the grid
        self.codes.clamp_(-0.499, 15.499)

    @torch.no_grad()
    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codes.round().clamp(0, 15), self.log_scale.detach().clone()

    @torch.no_grad()
    def load(self, state) -> None:
        self.codes.copy_(state[0])
        self.log_scale.copy_(state[1])

    @torch.no_grad()
    def tensors(self) -> dict[str, torch.Tensor]:
        codes = self.codes.round().clamp(0, 15).reshape(self.codes.shape[0], -1)  # [out, Kp]
        s = torch.where(self.dead, torch.zeros_like(self.log_scale), self.log_scale.exp() * self.sign).half()
        t = {"qweight": pack_nibbles(codes).contiguous(), "scales": s.contiguous()}
        if self.fmt.asym:
            t["zeros"] = self.zero[..., 0].to(torch.uint8).contiguous()
        return t


class _Swap:
    """Route chosen nn.Linear modules through their _FakeQuant weight while `quantized` is True."""

    def __init__(self, model: CausalLM, fakes: dict[str, _FakeQuant]):
        self.quantized = True
        self.modules = dict(model.named_modules())
        for name, fq in fakes.items():
            m = self.modules[name]
            m.forward = self._forward(m, fq)

    def _forward(self, m, fq):
        def forward(x):
            return F.linear(x, fq.weight() if self.quantized else m.weight, m.bias)
        return forward

    def remove(self) -> None:
        for m in self.modules.values():
            m.__dict__.pop("forward", None)


def _logits(model: CausalLM, windows: list[list[int]]) -> torch.Tensor:  # [T, V] fp32
    ids = torch.tensor([t for w in windows for t in w], dtype=torch.long)
    positions = torch.cat([torch.arange(len(w)) for w in windows])
    return model(ids, positions, AttentionMetadata.no_cache([len(w) for w in windows])).float()


def _kl(model: CausalLM, swap: _Swap, windows: list[list[int]]) -> torch.Tensor:
    """Mean over tokens of KL(float || quantized); gradients reach only the quantized forward."""
    with torch.no_grad():
        swap.quantized = False
        ref = F.log_softmax(_logits(model, windows), -1)  # [T, V]
        swap.quantized = True
    q = F.log_softmax(_logits(model, windows), -1)
    return (ref.exp() * (ref - q)).sum(-1).mean()


def tune_quantized(model: CausalLM, tensors: dict[str, dict[str, torch.Tensor]], formats: dict[str, str],
                   ids: list[int], cfg: TuneConfig | None = None) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Tune the int4 modules of `tensors` ({module: stored tensors}, in `formats`) on calibration `ids`.

    model: the unquantized model (float32, loaded unfused so every projection is its own nn.Linear); its
    weights are not changed. Returns (tensors with the tuned modules replaced, facts: KL at the start and
    at the end, steps run).
    """
    cfg = cfg or TuneConfig()
    if cfg.rounding not in ROUNDINGS:
        raise UnsupportedError(f"tune rounding {cfg.rounding!r}: expected one of {', '.join(ROUNDINGS)}")
    linears = dict(model.named_modules())
    fakes = {}
    for name, t in tensors.items():
        fmt = QuantFormat.parse(formats[name])
        if fmt.kind == "int4" and isinstance(linears.get(name), torch.nn.Linear):
            fakes[name] = _FakeQuant(t, fmt, linears[name].in_features, cfg.rounding == "learned")
    windows = [ids[i : i + cfg.context] for i in range(0, len(ids) - 1, cfg.context)]
    windows = [w for w in windows if len(w) > 1]
    if not fakes or not windows:
        return dict(tensors), {"kl_start": None, "kl_end": None, "steps": 0}
    for p in model.parameters():
        p.requires_grad_(False)
    params = [{"params": [f.log_scale for f in fakes.values()], "lr": cfg.lr_scale}]
    if cfg.rounding == "learned":
        params.append({"params": [f.codes for f in fakes.values()], "lr": cfg.lr_code})
    opt = torch.optim.Adam(params)
    # cosine decay to 0: at a constant rate the codes keep flipping and the calibration KL rose again after
    # 600 steps on stories260K
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / cfg.steps)))
    gen = torch.Generator().manual_seed(cfg.seed)
    swap = _Swap(model, fakes)
    try:
        def full_kl() -> float:
            with torch.no_grad():
                return sum(float(_kl(model, swap, windows[i : i + 16])) * sum(len(w) for w in windows[i : i + 16])
                           for i in range(0, len(windows), 16)) / sum(len(w) for w in windows)

        best_kl = start = full_kl()
        best = {n: f.state() for n, f in fakes.items()}
        bar = tqdm(range(1, cfg.steps + 1), desc="tuning", unit="step", disable=not cfg.progress, file=sys.stderr)
        for step in bar:
            pick = torch.randperm(len(windows), generator=gen)[: cfg.batch].tolist()
            loss = _kl(model, swap, [windows[i] for i in pick])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for f in fakes.values():
                f.clamp_()
            if step % cfg.eval_every == 0 or step == cfg.steps:
                kl = full_kl()
                if kl < best_kl:
                    best_kl, best = kl, {n: f.state() for n, f in fakes.items()}
                bar.set_postfix(kl=f"{kl:.5f}", best=f"{best_kl:.5f}")
        for n, f in fakes.items():
            f.load(best[n])
    finally:
        swap.remove()
    out = dict(tensors)
    out.update({n: f.tensors() for n, f in fakes.items()})
    return out, {"kl_start": start, "kl_end": best_kl, "steps": cfg.steps,
                 "kl_reduction_pct": 100 * (1 - best_kl / start) if start > 0 else 0.0 if math.isfinite(start) else None}


def tune_shards(src, qdir, shards: list[str], modules: dict[str, str], ids: list[int],
                cfg: TuneConfig | None = None) -> dict:
    """Tune the quantized shards in folder `qdir` (written from HF folder `src`) in place; returns the facts."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from strata.weights.loader import load_model

    src, qdir = Path(src), Path(qdir)
    model = load_model(str(src), dtype="float32", progress=False, fuse=False)
    state = {s: load_file(str(qdir / s)) for s in shards}
    where = {k.rsplit(".", 1)[0]: s for s, t in state.items() for k in t if k.endswith(".qweight")}
    tensors = {m: {k.rsplit(".", 1)[1]: v for k, v in state[where[m]].items() if k.rsplit(".", 1)[0] == m}
               for m in modules if m in where}
    tuned, facts = tune_quantized(model, tensors, modules, ids, cfg)
    for m, t in tuned.items():
        state[where[m]].update({f"{m}.{k}": v for k, v in t.items()})
    for s, t in state.items():
        tmp = qdir / f".{s}.tmp"
        save_file(t, str(tmp), metadata={"format": "pt"})
        tmp.replace(qdir / s)
    return facts
