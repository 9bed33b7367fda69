"""End-to-end prediction: TTFT, TPOT, tokens/s, memory per tier and energy for a model, system and scenario.

Decode is priced at the mean context (prompt + gen/2): attention cost is linear in context, so this equals
the average over the generated tokens. Batch "max" is the largest batch whose KV cache fits next to the
weights (MoE-Lens stage 1: capacity bounds the batch), optionally capped by the engine's max_num_seqs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from strata.analysis.costmodel import StepCost
from strata.analysis.efficiency import Efficiencies
from strata.analysis.hardware import System
from strata.analysis.operators import activation_bytes, build_ops, kv_cache_bytes, weight_bytes
from strata.analysis.placement import MEMORY_RESERVE, Plan, Scenario, plan_placement, step_cost
from strata.analysis.shapes import ModelShape


@dataclass
class Prediction:
    ttft_s: float
    tpot_s: float
    batch: int
    prefill_tok_s: float
    decode_tok_s: float  # per sequence
    throughput_tok_s: float  # generated tokens/s over the whole batch, prefill included
    memory: dict[str, float]
    energy_j_per_token: float
    plan: Plan
    prefill: StepCost
    decode: StepCost
    notes: list[str] = field(default_factory=list)

    def to_json(self, effs: Efficiencies) -> dict:
        return {
            "ttft_ms": self.ttft_s * 1e3, "tpot_ms": self.tpot_s * 1e3, "batch": self.batch,
            "prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s,
            "throughput_tok_s": self.throughput_tok_s, "memory_gb": {k: v / 1e9 for k, v in self.memory.items()},
            "energy_j_per_token": self.energy_j_per_token,
            "decode_breakdown_ms": {k: v * 1e3 for k, v in self.decode.breakdown(effs).items() if v},
            "placement": {"gpu_layers": self.plan.gpu_layers, "cpu_moe_layers": self.plan.cpu_moe_layers,
                          "expert_cache_frac": self.plan.cache_frac, "hit_rate": self.plan.hit_rate},
            "notes": self.notes + self.plan.notes,
        }


def max_batch(s: ModelShape, sys: System, sc: Scenario, context: int, cap: int = 8192) -> int:
    """Largest batch whose KV cache (at `context` tokens) fits beside the weights in device memory."""
    free = sys.device.memory_gb * 1e9 * sys.count * MEMORY_RESERVE - weight_bytes(s, sc.prec)["total"]
    free -= activation_bytes(s, sc.prec, 1, 512)
    per_seq = kv_cache_bytes(s, sc.prec, 1, context)
    return int(max(1, min(cap, free // max(per_seq, 1.0))))


def moe_lens_bound(s: ModelShape, sys: System, sc: Scenario) -> dict:
    """Throughput bound for offloaded batch decoding when host memory holds the weights and KV (MoE-Lens).

    Weights not resident on the device cross the link once per step whatever the batch; the batch is bounded
    by host capacity for KV. Returns the batch, the step time and tokens/s at that batch.
    """
    host = sys.host or sys.device
    wb = weight_bytes(s, sc.prec)
    ctx = sc.prompt + sc.gen
    kv_seq = kv_cache_bytes(s, sc.prec, 1, ctx)
    b = int(max(1, (host.memory_gb * 1e9 * MEMORY_RESERVE - wb["total"]) // kv_seq))
    streamed = max(wb["total"] - sys.device.memory_gb * 1e9 * MEMORY_RESERVE, 0.0)
    flops = sum(o.flops for o in build_ops(s, sc.prec, b, 1, sc.prompt + sc.gen // 2))
    t_link = streamed / (sys.device.link_gbs * 1e9)
    t_gpu = flops / (sys.device.peak(sc.prec.compute()) * 0.5)
    t_kv = b * kv_cache_bytes(s, sc.prec, 1, sc.prompt + sc.gen // 2) / (host.bw * 0.6)
    step = max(t_link, t_gpu, t_kv)
    bound = {t_link: "link", t_gpu: "device compute", t_kv: "host KV bandwidth"}[step]
    return {"batch": b, "step_s": step, "tokens_per_s": b / step, "bottleneck": bound}


def predict(s: ModelShape, sys: System, sc: Scenario, effs: Efficiencies | None = None,
            batch_cap: int | None = None) -> Prediction:
    effs = effs or Efficiencies.load()
    mid = sc.prompt + sc.gen // 2
    batch = sc.batch if sc.batch > 0 else max_batch(s, sys, sc, sc.prompt + sc.gen, batch_cap or 8192)
    kv = kv_cache_bytes(s, sc.prec, batch, sc.prompt + sc.gen)
    plan = plan_placement(s, sys, sc, kv)
    pre = step_cost(s, sys, sc, plan, batch, max(sc.prompt, 1), 0)
    dec = step_cost(s, sys, sc, plan, batch, 1, mid)
    ttft, tpot = pre.time(effs), dec.time(effs)
    wb = weight_bytes(s, sc.prec)
    on_dev = wb["total"] if plan.gpu_layers >= s.layers else wb["total"] * plan.gpu_layers / s.layers
    if s.is_moe and plan.cache_frac < 1.0:
        on_dev -= wb["experts"] * (1 - plan.cache_frac)
    memory = {"device_weights": on_dev, "lower_tier_weights": wb["total"] - on_dev, "kv_cache": kv,
              "activations": activation_bytes(s, sc.prec, batch, max(sc.prompt, 1))}
    total = ttft + sc.gen * tpot
    pred = Prediction(
        ttft_s=ttft, tpot_s=tpot, batch=batch, prefill_tok_s=batch * sc.prompt / ttft if sc.prompt else 0.0,
        decode_tok_s=1.0 / tpot, throughput_tok_s=batch * sc.gen / total if sc.gen else 0.0, memory=memory,
        energy_j_per_token=dec.energy_j(effs) / batch, plan=plan, prefill=pre, decode=dec)
    if sys.device.approximate or (sys.host and sys.host.approximate):
        pred.notes.append("hardware profile has approximate figures")
    if sc.engine == "strata" and not sys.device.strata_host and sys.device.cls.startswith("cpu"):
        pred.notes.append("Strata's host costs per call are the development machine's (strata_fit.json); "
                          "`strata probe` measures this machine's")
    return pred
