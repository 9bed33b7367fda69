"""Where each layer's weights live and where each operator runs, for one Scenario on one System.

Placements (from the Scenario or chosen automatically by capacity):
* all on the device;
* llama.cpp-style `gpu_layers` (the rest of the layers run on the host CPU) and `cpu_moe_layers` (routed
  experts of the first N layers on the host CPU, Fiddler / KTransformers / --n-cpu-moe);
* routed experts in a lower tier (host RAM or flash) behind an expert cache holding `cache_frac` of each
  layer's experts with hit rate `hit_rate`; a miss is either transferred and run on the device, or run by
  the host CPU where the weights are (Fiddler's rule: pick the cheaper, `cold="auto"`);
* in-flash compute designs run what does not fit in memory inside the flash at its internal bandwidth.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from strata.analysis import efficiency
from strata.analysis.costmodel import Segment, StepCost
from strata.analysis.efficiency import (
    CUBLAS,
    GPU_OFFLOAD_MIN_TOKENS,
    IQK_FORKS,
    IQK_SINCE,
    LLAMACPP_CPU_SHARE,
    LLAMACPP_DYNAMIC_SCHED,
    LLAMACPP_FLASH_ATTN,
    LLAMACPP_MMQ,
    LLAMACPP_ODD_LEGACY,
    LLAMACPP_PRE_SGEMM_SHARE,
    LLAMACPP_SGEMM,
    LLAMACPP_SGEMM_FORMATS,
    LLAMACPP_UBATCH,
    LLAMACPP_VNNI,
    NUMA_AWARE_ENGINES,
    PRE_VNNI_INT8_PER_FP32,
    STRATA_GEMV_MAX_ROWS,
    STRATA_TILE_BYTES,
)
from strata.analysis.engines import (
    EXPERT_OFFLOAD_FAMILIES,
    LOOPED_EXPERT_FAMILIES,
    NPU_PREFILL_FAMILIES,
    STREAMING_OFFLOAD_FAMILIES,
)
from strata.analysis.hardware import System
from strata.analysis.operators import build_ops, distinct_experts, weight_bytes
from strata.analysis.precision import Precisions, bytes_per_elem, canon, needs_dequant
from strata.analysis.shapes import ModelShape
from strata.layers.moe import NATIVE_MAX_TOKENS

MEMORY_RESERVE = 0.9  # usable fraction of device memory (runtime, fragmentation)
SYNC_US = 10.0  # host<->device round trip per offloaded layer
# A copy from pageable host memory (llama.cpp's mmap'd weights) is staged: the driver has one CPU core copy each
# chunk into a pinned buffer, then DMAs it, so the link sees 1 / (1 / link + 1 / core copy rate). One server
# core copies memory at about this rate (a core's load/store bandwidth, well under the socket's).
STAGING_COPY_GBS = 12.0


@dataclass
class Scenario:
    batch: int = 1
    prompt: int = 512
    gen: int = 128
    prec: Precisions = field(default_factory=Precisions)
    engine: str = "generic"
    offload: str = "auto"  # "none", "auto", "experts", "layers"
    expert_tier: str = "host"  # where offloaded experts live: "host" or "flash"
    cold: str = "auto"  # cold experts: "transfer" to the device, "cpu" compute in place, "auto" cheaper
    gpu_layers: int | None = None
    cpu_moe_layers: int = 0
    cache_frac: float | None = None  # fraction of each layer's routed experts resident on the device
    hit_rate: float | None = None  # expert-cache hit rate; default = cache_frac (uniform routing)
    prefetch: float = 0.0  # fraction of transfers overlapped with compute
    build_date: tuple[int, int] | None = None  # (year, month) of the engine build, where known (dates its kernels)
    engine_name: str = ""  # the engine as named within its family (llamafile, ik_llama.cpp: their own CPU kernels)
    engine_version: str | None = None


@dataclass
class Plan:
    gpu_layers: int
    cpu_moe_layers: int
    cache_frac: float
    hit_rate: float
    expert_tier: str
    in_flash: bool = False
    notes: list[str] = field(default_factory=list)


def plan_placement(s: ModelShape, sys: System, sc: Scenario, kv_bytes: float) -> Plan:
    wb = weight_bytes(s, sc.prec)
    cap = sys.device.memory_gb * 1e9 * sys.count * MEMORY_RESERVE
    lower = sys.host is not None or bool(sys.device.flash)
    gpu_layers = s.layers if sc.gpu_layers is None else min(sc.gpu_layers, s.layers)
    cache_frac = 1.0 if sc.cache_frac is None else sc.cache_frac
    tier = sc.expert_tier if sys.host is not None or sc.expert_tier == "flash" else "flash"
    p = Plan(gpu_layers, sc.cpu_moe_layers, cache_frac, 1.0, tier)
    fits = wb["total"] + kv_bytes <= cap
    if sc.offload == "none" or (sc.offload == "auto" and (fits or not lower)) or sc.gpu_layers is not None:
        if not fits and sc.gpu_layers is None:
            p.notes.append(f"weights {wb['total'] / 1e9:.1f} GB + KV do not fit {cap / 1e9:.1f} GB usable memory")
    elif sys.device.in_flash_compute:
        p.in_flash = True
    elif s.is_moe and sc.offload in ("auto", "experts") and sc.cpu_moe_layers == 0:
        room = max(cap - wb["non_expert"] - kv_bytes, 0.0)
        p.cache_frac = min(cache_frac, room / wb["experts"]) if sc.cache_frac is None else cache_frac
        p.cache_frac = min(p.cache_frac, room / wb["experts"])
        p.notes.append(f"routed experts in {tier}; {p.cache_frac:.0%} of them cached on the device")
    elif sys.host is not None:
        per_layer = wb["total"] / s.layers
        p.gpu_layers = int(max(cap - kv_bytes - 2 * s.vocab * s.hidden * sc.prec.weight_bytes(False), 0) // per_layer)
        p.gpu_layers = min(p.gpu_layers, s.layers)
        p.notes.append(f"{p.gpu_layers}/{s.layers} layers on the device, the rest on the host CPU")
    else:
        p.cache_frac = max(min((cap - kv_bytes) / wb["total"], 1.0), 0.0)
        p.notes.append(f"weights streamed from flash; {p.cache_frac:.0%} resident in memory")
        p.expert_tier = "flash-all"
    p.hit_rate = sc.hit_rate if sc.hit_rate is not None else p.cache_frac
    return p


def dequant_gemm_rule(sc: Scenario, dev) -> tuple[int, bool]:
    """(tokens from which an engine runs a quantized matmul as dequantize-to-16-bit + 16-bit GEMM, whether that
    16-bit copy goes through memory); (0, False) where its quantized kernels read the blocks directly."""
    if sc.engine == "strata":  # QuantLinear: row tiles expanded into a reused, cache-resident bf16 buffer
        return STRATA_GEMV_MAX_ROWS + 1, False
    if (sc.engine.startswith("llama.cpp") and dev.cls == "gpu" and dev.tensor_cores and sc.build_date is not None
            and sc.build_date < LLAMACPP_MMQ):  # cuBLAS fp16 on a full fp16 copy of the weights
        return GPU_OFFLOAD_MIN_TOKENS, True
    return 0, False


def runs_cublas_fp16(sc: Scenario, dev, fmt: str, tokens: int) -> bool:
    """Whether llama.cpp hands this matmul to cuBLAS as an fp16 GEMM with fp16 accumulate (ggml-cuda's
    mul_mat_cublas): fp16 weights of a prompt (>= 32 tokens) on a GPU with tensor cores; quantized weights take
    that path only in builds before MMQ (dequant_gemm_rule)."""
    return (sc.engine.startswith("llama.cpp") and dev.cls == "gpu" and dev.tensor_cores
            and tokens >= GPU_OFFLOAD_MIN_TOKENS and canon(fmt) == "fp16")


def unfused_attention(s: ModelShape, sc: Scenario, op, batch: int, new: int, past: int):
    """A prompt's attention in llama.cpp builds before flash attention was its default: per ubatch of
    LLAMACPP_UBATCH tokens, K*Q over every cached key (the causal mask applied afterwards), the fp32 scores written,
    soft-maxed in place (read + write) and read again by the V product; None where flash attention prices it."""
    if not (sc.engine.startswith("llama.cpp") and new > 1 and sc.build_date is not None
            and sc.build_date < LLAMACPP_FLASH_ATTN) or s.is_mla or s.attn_kind[op.layer] != "full":
        return None
    starts = range(0, new, LLAMACPP_UBATCH)
    scores = batch * s.heads * sum(min(LLAMACPP_UBATCH, new - u) * (past + min(u + LLAMACPP_UBATCH, new))
                                   for u in starts)
    return replace(op, flops=2.0 * scores * 2 * s.head_dim, act_bytes=op.act_bytes + 16.0 * scores)


X86_CLASSES = {"cpu-x86", "cpu-server"}


def _version(v: str | None) -> tuple[int, ...] | None:
    """'0.8.6' -> (0, 8, 6); None for a build number ('b6000') or nothing."""
    return tuple(int(x) for x in re.findall(r"\d+", v)) if v and v[0].isdigit() else None


def kernel_share(sc: Scenario, dev, op, tokens: int) -> float:
    """Share of the class's matmul FLOP rate this engine build's kernel reaches on this op's weight type (1 where
    nothing dated says otherwise): the llama.cpp family's CPU prompt kernels by build and type, the int8 rate of
    x86 builds before VNNI, and builds before dynamic scheduling on hybrid CPUs (efficiency.py)."""
    if not (sc.engine.startswith("llama.cpp") and dev.cls.startswith("cpu") and tokens > 1 and op.fmt):
        return 1.0
    even = dev.even_split_share() if sc.build_date is not None and sc.build_date < LLAMACPP_DYNAMIC_SCHED else 1.0
    return even * _pre_vnni_share(sc, dev, op) * _kernel_generation_share(sc, dev, op)


def _pre_vnni_share(sc: Scenario, dev, op) -> float:
    """x86 builds before the VNNI int8 dot product: int8 at AVX2's 2x the fp32 rate (efficiency.LLAMACPP_VNNI)."""
    if dev.cls not in X86_CLASSES or op.compute != "int8" or sc.build_date is None or sc.build_date >= LLAMACPP_VNNI:
        return 1.0
    return min(1.0, PRE_VNNI_INT8_PER_FP32 * dev.peak("fp32") / dev.peak("int8"))


def _kernel_generation_share(sc: Scenario, dev, op) -> float:
    """The tiled Q4_0 / Q8_0 kernel by build date; K-quants and odd legacy types by mainline or iqk kernels."""
    if op.fmt in LLAMACPP_SGEMM_FORMATS:
        return LLAMACPP_PRE_SGEMM_SHARE if sc.build_date is not None and sc.build_date < LLAMACPP_SGEMM else 1.0
    if dev.cls not in X86_CLASSES:  # the K-quant figures are x86 tables (AVX2 / Zen 4)
        return 1.0
    kind = ("legacy" if op.fmt in LLAMACPP_ODD_LEGACY
            else "kquant" if op.fmt.startswith(("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq")) else "")
    if not kind:
        return 1.0
    since = IQK_SINCE.get(sc.engine_name)
    version = _version(sc.engine_version)
    iqk = sc.engine_name in IQK_FORKS or (since is not None and (version is None or version >= since[op.routed]))
    return LLAMACPP_CPU_SHARE["iqk" if iqk else "mainline"][kind]


def numa_copies_fit(s: ModelShape, sc: Scenario, plan: Plan, host) -> bool:
    """Whether a NUMA-aware engine can keep one copy of its host-resident weights per socket (KTransformers'
    dual-socket mode copies them: 382 GB of DeepSeek-V3 Q4_K_M per socket, 1 TB in all); when the copies do not
    fit host memory the engine holds one (its int8 AMX build: 644 GB on a 1 TB host) and each read is served by
    the memory of the socket holding the page."""
    wb = weight_bytes(s, sc.prec)
    device_layers = min(plan.gpu_layers, s.layers)  # the others sit on the host whole; of these, the experts of
    on_host = (wb["total"] * (s.layers - device_layers)  # the first cpu_moe_layers
               + wb["experts"] * min(plan.cpu_moe_layers, device_layers)) / s.layers
    return host.sockets * on_host <= host.memory_gb * 1e9 * MEMORY_RESERVE


def _tile_spills(op, dev) -> bool:
    """Whether Strata's bf16 tile of this op's matrices (quant_linear: up to STRATA_TILE_BYTES, at least 16 rows)
    outgrows the last-level cache, so the expand pass writes it to memory and the GEMM reads it back."""
    if not dev.llc_mb or not op.matrix_elems:
        return False
    return min(op.matrix_elems * 2.0, STRATA_TILE_BYTES) > dev.llc_mb * 2**20


def step_cost(s: ModelShape, sys: System, sc: Scenario, plan: Plan, batch: int, new: int, past: int) -> StepCost:
    """Price one forward step (batch sequences x new tokens, past tokens cached) under a placement."""
    dev, host = sys.device, sys.host or sys.device
    tp = sys.count if sys.parallel == "tp" else 1
    seg_dev = Segment("device", dev, sc.engine, bw_scale=tp, flops_scale=tp)
    seg_host = Segment("host", host, sc.engine)
    seg_flash = Segment("flash", dev, sc.engine)
    cost = StepCost([seg_dev, seg_host, seg_flash], tokens=batch * new, overlap=sc.prefetch, seqs=batch)
    n = batch * new
    if host.sockets > 1 and sc.engine in NUMA_AWARE_ENGINES:
        seg_host.numa_local = numa_copies_fit(s, sc, plan, host)
    layers_touched_host = set()
    looped = sc.engine in LOOPED_EXPERT_FAMILIES
    # Strata runs a step of up to NATIVE_MAX_TOKENS tokens (a decode batch, a short prompt) through a layer's resident
    # experts in one native call, grouped by expert: each touched expert's weights stream once through its GEMV
    # kernel for all its tokens (moe_native.py: moe_decode_batch); with an expert provider (offloaded experts) or
    # more tokens it loops over the experts in Python
    strata = sc.engine == "strata"
    native_moe = strata and n <= NATIVE_MAX_TOKENS and sc.offload != "experts" and plan.hit_rate >= 1.0
    # Strata's Python expert loop costs its measured time per matrix call (in place of the per-call overhead)
    # (probed on this machine where the device has them, else strata_fit.json's development-machine figures)
    loop_us = 0.0
    if strata:
        key = "prefill_loop_us_per_expert_call" if n > 1 else "loop_us_per_expert_call"
        fallback = efficiency.STRATA_PREFILL_LOOP_US if n > 1 else efficiency.STRATA_LOOP_US
        loop_us = dev.strata_host.get(key, fallback)
    # llama.cpp with a GPU: big-batch matmuls on host-resident weights run on the GPU, weights copied per step
    host_to_gpu = sys.host is not None and dev.cls == "gpu" and (
        (sc.engine.startswith("llama.cpp") and n >= GPU_OFFLOAD_MIN_TOKENS) or sc.engine in STREAMING_OFFLOAD_FAMILIES)
    # mllm-NPU: prompt matmuls on the phone's NPU in int8, decode on the CPU
    npu = sc.engine in NPU_PREFILL_FAMILIES and n > 1 and "npu_int8" in dev.peak_tflops

    deq_from, deq_copy = dequant_gemm_rule(sc, dev)

    def put(seg: Segment, op, frac: float = 1.0, suffix: str = "", nbytes: float | None = None) -> None:
        calls = 1.0 if native_moe and op.routed else op.launches if looped or not op.routed else min(op.launches, 3.0)
        if op.routed and looped and not native_moe:
            calls *= frac  # a loop calls only the experts this share covers
            if loop_us:
                seg.host_s += calls * loop_us * 1e-6
                calls = 0.0
        native = native_moe and op.routed  # the grouped kernel reads the quantized blocks, never expands them
        if (deq_from and n >= deq_from and seg.proc == "device" and nbytes is None and op.fmt
                and needs_dequant(op.fmt) and not native):
            # one pass expands the blocks (read quantized, write 16-bit), the GEMM reads that copy; a copy kept in
            # cache (Strata's tiles, unless a tile outgrows the last-level cache) costs no traffic beyond the read
            q = op.weight_bytes * frac
            copy = q * 2.0 / bytes_per_elem(op.fmt) if deq_copy or (strata and _tile_spills(op, seg.dev)) else 0.0
            # Strata's expand pass runs at its measured rate (weights per second, tile in cache) where the profile
            # has one, inside the same QuantLinear call as the GEMM (no call of its own)
            rate = seg.dev.dequant_gelem_s.get(op.fmt, 0.0) if strata else 0.0
            sec = q / bytes_per_elem(op.fmt) / (rate * 1e9) if rate else 0.0
            seg.add(op.name + suffix + ".dequant", 0.0, q + copy, seg.dev.peak("fp16"), q, op.fmt,
                    0.0 if strata else calls, sec)
            seg.add(op.name + suffix, op.flops * frac, copy + (op.act_bytes + op.kv_bytes) * frac,
                    seg.dev.peak("fp16_acc16"), 0.0, "", calls)
            return
        wb = op.weight_bytes * frac if nbytes is None else 0.0
        # Strata's matmul of more rows than its GEMV takes streams weights at the measured few-row matmul rate
        rate = seg.dev.gemm_eff_at(op.rows) if strata and op.rows > STRATA_GEMV_MAX_ROWS and not native else 0.0
        peak = seg.dev.peak("npu_int8" if npu and op.fmt and seg.proc == "device" else op.compute)
        peak *= kernel_share(sc, seg.dev, op, n)
        library = ""
        if seg.proc == "device" and op.fmt and runs_cublas_fp16(sc, seg.dev, op.fmt, n):
            peak, library = seg.dev.peak("fp16_acc16"), CUBLAS
        seg.add(op.name + suffix, op.flops * frac, op.bytes * frac if nbytes is None else nbytes,
                peak, wb, op.fmt, calls, rate=rate, library=library)

    for op in build_ops(s, sc.prec, batch, new, past):
        if op.name == "attention":
            op = unfused_attention(s, sc, op, batch, new, past) or op
        on_host_layer = op.layer >= plan.gpu_layers and op.layer >= 0
        if plan.expert_tier == "flash-all" and op.weight_bytes:
            miss = 1.0 - plan.hit_rate
            cost.flash_s += op.weight_bytes * miss / max(dev.flash_bw(op.weight_bytes), 1.0)
        if plan.in_flash and op.weight_bytes > 1e6:
            put(seg_flash, op)
            continue
        if on_host_layer or (op.routed and op.layer < plan.cpu_moe_layers):
            if host_to_gpu and op.weight_bytes:
                put(seg_dev, op, suffix=".copied", nbytes=op.act_bytes)
                cost.link_s += op.weight_bytes * (1.0 / dev.link_gbs + 1.0 / STAGING_COPY_GBS) * 1e-9
                continue
            put(seg_host if sys.host is not None else seg_dev, op)
            layers_touched_host.add(op.layer)
            continue
        if op.routed and plan.hit_rate < 1.0 and plan.expert_tier != "flash-all":
            _price_cold_experts(s, sys, sc, plan, op, n, seg_dev, seg_host, cost, put)
            layers_touched_host.add(op.layer)
            continue
        put(seg_dev, op)
    if sys.host is not None and layers_touched_host:
        cost.link_s += len(layers_touched_host) * 2 * SYNC_US * 1e-6
    if tp > 1:  # two all-reduces of the hidden state per layer
        link = (dev.nvlink_gbs or dev.link_gbs) * 1e9
        msg = n * s.hidden * 2.0
        cost.comm_s = s.layers * 2 * (2 * (tp - 1) / tp * msg / link + 8e-6)
    return cost


def _price_cold_experts(s, sys, sc, plan, op, n, seg_dev, seg_host, cost, put) -> None:
    """Cached experts run on the device; misses are transferred (or read from flash) or run on the host."""
    dev, host = sys.device, sys.host or sys.device
    h = plan.hit_rate
    put(seg_dev, op, h, ".hit")
    touched = distinct_experts(s.num_experts, s.top_k, n)
    per_expert = op.weight_bytes / max(touched, 1e-9)
    miss_bytes = op.weight_bytes * (1 - h)
    if plan.expert_tier == "flash":
        read_s = miss_bytes / max((host if sys.host else dev).flash_bw(per_expert), 1.0)
        cost.flash_s += read_s
        link_s = miss_bytes / (dev.link_gbs * 1e9) if sys.host is not None else 0.0
    else:
        link_s = miss_bytes / (dev.link_gbs * 1e9)
    # Fiddler: run the cold expert on the CPU that holds it when that beats moving it to the device.
    cpu_s = max(op.flops * (1 - h) / (host.peak(op.compute) * 0.3), miss_bytes / (host.bw * 0.6))
    # engines built around an expert cache (mixtral-offloading, MoE-Infinity) always fetch a miss to the GPU
    cold = "transfer" if sc.engine in EXPERT_OFFLOAD_FAMILIES else sc.cold
    use_cpu = sys.host is not None and (cold == "cpu" or (cold == "auto" and cpu_s < link_s))
    if use_cpu:
        put(seg_host, op, 1 - h, ".miss")
    else:
        put(seg_dev, op, 1 - h, ".miss", nbytes=op.act_bytes * (1 - h))
        cost.link_s += link_s
