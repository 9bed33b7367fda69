"""Efficiency factors: the fraction of peak bandwidth / FLOPs an engine reaches on a hardware class, the share
of that bandwidth a dequantizing GEMV keeps (eta_q), and a fixed overhead per kernel call (launch, dispatch,
framework loop; a dense transformer layer makes 10 calls: 2 norms, q/k/v/o, attention, 3 FFN matrices).

Priors are physical guesses stated once here; `calibration.json` (written by calibrate.py) holds the fitted
values per hardware class, per engine (a ratio applied on every class, key '*|engine') and per (class, engine)
cell with enough rows. Lookup: cell -> class x engine ratio -> class -> prior.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from strata.analysis.engines import identify

CALIBRATION_PATH = Path(__file__).with_name("calibration.json")
# Strata's host costs (per kernel call, per call of its Python expert loop), measured on thin twins of the
# benchmark models by benchmarks/step_overhead.py (the one place those numbers live; rerun it to remeasure)
STRATA_FIT_PATH = Path(__file__).with_name("strata_fit.json")
BOUNDS = {"eta_bw": (0.05, 1.0), "eta_flops": (0.02, 1.0), "overhead_us": (0.0, 200.0), "eta_q": (0.2, 1.0),
          "seq_us": (0.0, 200.0)}


@dataclass
class Eff:
    eta_bw: float  # achieved / peak memory bandwidth for streaming weights and KV
    eta_flops: float  # achieved / peak FLOP/s for matmuls with many tokens
    overhead_us: float  # fixed time per kernel call per forward step
    eta_q: float = 0.8  # share of eta_bw a dequantizing (block / group / weight-only) GEMV reaches
    seq_us: float = 10.0  # host time per sequence per step (scheduler, sampler, request state), overlapped with the GPU

    def clamp(self) -> Eff:
        return Eff(*(min(max(getattr(self, k), lo), hi) for k, (lo, hi) in BOUNDS.items()))

    def times(self, ratio: Eff) -> Eff:
        """This class factor scaled by an engine ratio."""
        return Eff(self.eta_bw * ratio.eta_bw, self.eta_flops * ratio.eta_flops, self.overhead_us * ratio.overhead_us,
                   self.eta_q * ratio.eta_q, self.seq_us * ratio.seq_us).clamp()


NEUTRAL = Eff(1.0, 1.0, 1.0, 1.0, 1.0)  # engine ratio prior: an engine is as good as its class until rows say otherwise
PRIORS = {
    # seq_us on GPUs, from trtllm-bench 128/128 runs that are not in the validation CSV (TensorRT-LLM
    # perf-overview.md): Qwen3-30B-A3B NVFP4 makes 39.8k output tok/s on a B200 but 24.1k on a GB200, the same GPU
    # behind a slower host CPU, so the host loop bounds it; on the B200's x86 host that is at most
    # 1 / 39.8k s = 25 us per sequence per step.
    "gpu": Eff(0.75, 0.5, 3.0, 0.8, 25.0),
    "apple": Eff(0.7, 0.5, 3.0),
    "cpu-x86": Eff(0.6, 0.3, 3.0),
    "cpu-server": Eff(0.5, 0.3, 5.0),
    "cpu-arm": Eff(0.5, 0.3, 5.0),
    "cpu-measured": Eff(0.9, 0.8, 3.0),  # probe ceilings are already achieved figures
    "design": Eff(0.9, 0.7, 0.0, 1.0, 0.0),  # simulated designs report ideal pipelines
}
DEFAULT = Eff(0.6, 0.4, 3.0)
# Engine ratios with a measured prior instead of NEUTRAL. llama.cpp before CUDA graphs launched every kernel from
# the host: the graphs PR measured Llama-2-7B Q4_K_M decode on an H100 PCIe at 143.35 -> 163.83 tok/s (llama.cpp
# issue #6763), 0.87 ms per token over ~330 kernel calls = 2.7 us more per call than the ~5 us with graphs.
RATIO_PRIORS = {"*|llama.cpp-2023": Eff(1.0, 1.0, 1.5, 1.0, 1.0)}
# A measured prior on the share of peak FLOPs an engine ratio reaches on one class (class factor x ratio), where
# the ratio's own prior (NEUTRAL) would say nothing: NVIDIA's GEMM libraries on a GPU. cuBLAS 12.5 (torch._scaled_mm,
# PyTorch 24.07 container) ran FP8 GEMMs at 1296.9 TFLOP/s on an HGX H100 SXM, 0.655 of its 1979 dense FP8 peak
# (NVIDIA/cutlass issue #1662, 2024-07-30; bf16 764.9 of 989, 0.773); the FP8 figure, as most of the vendor group's
# large-batch rows are FP8. Keyed by the first engine of the ratio's group (calibrate.ENGINE_FLOPS_RATIOS).
SHARE_PRIORS = {"*|trt-llm": ("gpu", 1296.9 / 1979)}
ENGINE_PARENTS = {"llama.cpp-2023": "llama.cpp"}  # a dated build keeps its family's fitted ratio
# Classes a dated build's own ratio acts on; elsewhere the build is its parent family. CUDA graphs are a CUDA
# feature (ggml-cuda): Metal encodes each graph into command buffers and the CPU backend calls no driver, so a
# llama.cpp build before graphs launches like a current one on Apple GPUs and CPUs.
RATIO_CLASSES = {"llama.cpp-2023": ("gpu",)}
# The kernel library an engine hands some matmuls to, priced at that library's share (a ratio key like an engine's):
# llama.cpp runs fp16 prompt GEMMs, and before MMQ its dequantized ones, through cuBLAS (placement.runs_cublas_fp16)
CUBLAS = "cublas"


def _strata_fit() -> dict:
    """strata_fit.json ({} where not measured)."""
    if not STRATA_FIT_PATH.exists():
        return {}
    with open(STRATA_FIT_PATH) as f:
        return json.load(f)


_FIT = _strata_fit()
# Strata's eager CPU loop (Python dispatch, norms, rope, KV append): its overhead per call is measured; its
# weights stream at the probed GEMV rates, so eta_bw / eta_flops stay at the cpu-measured prior.
PRIORS["cpu-measured|strata"] = (replace(PRIORS["cpu-measured"], overhead_us=float(_FIT["overhead_us_per_call"]))
                                 if "overhead_us_per_call" in _FIT else PRIORS["cpu-measured"])
# Host time of one expert matrix call in Strata's Python expert loop: decode with offloaded experts (a thin OLMoE
# twin decoded with and without the native MoE call) and prompts (sorting and gathers per expert; the twin's
# prefill). 0 where not measured: the per-call overhead alone then applies.
STRATA_LOOP_US = float(_FIT.get("loop_us_per_expert_call", 0.0))
STRATA_PREFILL_LOOP_US = float(_FIT.get("prefill_loop_us_per_expert_call", 0.0))
# Engines that place weights per NUMA node (KTransformers' dual-socket mode keeps a copy of the experts per socket).
# The others leave a model's pages on the node that first touched them, so on an n-socket host every read is
# served by one socket's memory controllers: bandwidth of one socket, FLOPs of all of them.
NUMA_AWARE_ENGINES = {"ktransformers"}
# llama.cpp runs a matmul whose weights sit in host memory on the GPU when it has at least this many tokens,
# copying the weights over the link each time (ggml-cuda offload_op); fewer tokens run on the host CPU.
GPU_OFFLOAD_MIN_TOKENS = 32
# Largest batch an engine's offline max-throughput benchmark runs, whatever the KV cache would hold: trtllm-bench
# caps the batch it tunes for at 4096 sequences (tensorrt_llm/bench/build/tuning.py, finetune_setting).
MAX_BENCH_BATCH = {"trt-llm": 4096}

def engine_family(text: str) -> str:
    """Efficiency family of the engine a free-text system column names (engines.py); 'generic' if none."""
    return identify(text).family


MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
LLAMACPP_GRAPHS = (2024, 5)  # llama.cpp gained CUDA graphs (far fewer launches per token) around May 2024
# Before llama.cpp PR #8075 (merged 2024-06-23) a CUDA matmul of quantized weights with more than a few tokens
# dequantized the weights to fp16 and ran cuBLAS in fp16 (fp16 accumulate) on GPUs with tensor cores; after it,
# int8 tensor-core MMQ kernels read the quantized blocks directly. Builds dated before this run the old path.
LLAMACPP_MMQ = (2024, 7)
# llama.cpp gained flash attention in PR #5021 (merged 2024-04-30) as an opt-in flag (-fa, llama-bench -fa 0 by
# default); issue #10005 (2024-10) still proposed making it the default. Builds dated before 2025 are priced with the
# unfused prompt attention (placement.unfused_attention); undated builds are taken as current ones (flash attention).
LLAMACPP_FLASH_ATTN = (2025, 1)
LLAMACPP_UBATCH = 512  # tokens per physical batch of a prompt (llama.cpp's n_ubatch / n_batch default)
# CPU prompt matmuls of the llama.cpp family, as a share of the FLOP rate of llama.cpp's tiled Q4_0 / Q8_0 kernel
# (llamafile's tinyBLAS, upstreamed by llama.cpp PR #6414, merged 2024-04-16), which the class factor prices:
# * builds before that PR ran a Q4_0 / Q8_0 prompt as the decode dot product once per (row, column); the PR states
#   Q4_0 and Q8_0 prompts "should go ~40% faster", and ik_llama.cpp PR #533 recalls 40-50% at the time;
# * K-quants, i-quants and Q4_1 / Q5_0 / Q5_1 have no tiled kernel upstream: PR-512 of Mixtral-8x7B on a Ryzen 9
#   7950X (llamafile PR #428, main-branch column) was 59.2 t/s in Q4_0, 47.9 on average over Q2_K_S, Q3_K_S,
#   Q4_K_S, Q5_K_S, Q6_K and IQ4_XS, 31.8 over Q4_1 / Q5_0 / Q5_1; ik_llama.cpp PR #533 (June 2025) still names Q4_0
#   the fastest mainline type on that CPU;
# * Iwan Kawrakow's iqk_mul_mat kernels for those types (llamafile PR #394, in release 0.8.4, and PR #428 for MoE
#   layers, in 0.8.5; ik_llama.cpp, his fork, throughout) made them 82.1 and 66.3 t/s in the same table.
LLAMACPP_SGEMM = (2024, 4)
# x86 int8 dot products of the llama.cpp family (Q4_0 / Q8_0 blocks times the prompt quantized to Q8_0): before
# llama.cpp PR #6280 ("Support AVX512VNNI", 2024-03-24: Q4_0 / Q8_0 faster on Zen 4) they ran AVX2's maddubs + madd
# pair, two instructions for the 32 multiply-adds one VNNI vpdpbusd does (PR #4589, 2023-12-22, only reported the
# AVX-VNNI flag: "This does not add support - it just prints"), so an older build reaches at most 2x the fp32 FMA
# rate where the catalog's int8 peak of a VNNI part (4x) assumes VNNI.
LLAMACPP_VNNI = (2024, 4)
# ggml split a matmul's rows evenly over its threads until llama.cpp PR #6915 ("use dynamic thread scheduling for
# matrix multiplication", opened 2024-04) let threads take chunks as they finish; on a hybrid Intel CPU run on all its
# hardware threads (an i9-13900K's 32: 16 on 8 P-cores, 16 on 16 E-cores, llama.cpp issue #842) every thread then waits
# for the slowest (Device.even_split_share); PR #1947 (2023-06, not merged) measured 3-9 % from chunking on 13th-gen
# Intel. Builds dated before May 2024 split evenly.
LLAMACPP_DYNAMIC_SCHED = (2024, 5)
PRE_VNNI_INT8_PER_FP32 = 2.0
LLAMACPP_PRE_SGEMM_SHARE = 1 / 1.45
LLAMACPP_SGEMM_FORMATS = {"q4_0", "q8_0"}
LLAMACPP_ODD_LEGACY = {"q4_1", "q5_0", "q5_1"}
LLAMACPP_CPU_SHARE = {"mainline": {"kquant": 47.9 / 59.2, "legacy": 31.8 / 59.2},
                      "iqk": {"kquant": 82.1 / 59.2, "legacy": 66.3 / 59.2}}
IQK_SINCE = {"llamafile": ((0, 8, 4), (0, 8, 5))}  # (dense, MoE) first releases with the iqk kernels; forks: always
IQK_FORKS = {"ik_llama.cpp"}
# Strata's QuantLinear runs a GEMV kernel up to this many rows and dequantize + bf16 GEMM above (mirrors
# strata/layers/quant_linear.GEMV_MAX_ROWS; a test keeps them equal)
STRATA_GEMV_MAX_ROWS = 4
STRATA_TILE_BYTES = 64 << 20  # bf16 bytes per expanded tile with several threads (quant_linear.TILE_BYTES)


# llama.cpp issue / PR numbers grow with time; two numbers with known dates bound the date of a thread that
# states none: #6763 (the CUDA graphs proposal, 2024-04-19) and #8075 (MMQ by default, 2024-06-23). A thread is
# dated by its opening, so this holds for issues and PRs, not for discussions that collect results for years.
LLAMACPP_THREAD_DATES = ((6763, (2024, 4)), (8075, (2024, 6)))


def source_date(text: str) -> tuple[int, int] | None:
    """Earliest (year, month) written in a source/notes string, else bounded by a llama.cpp issue / PR number."""
    t = text.lower()
    found = [(int(y), int(m)) for y, m in re.findall(r"\b(20\d\d)-(\d\d)\b", t)]
    found += [(int(y), MONTHS.index(m[:3]) + 1) for m, y in re.findall(r"\b([a-z]{3})[a-z]* (20\d\d)\b", t)
              if m[:3] in MONTHS]
    if found:
        return min(found)
    m = re.search(r"(?<![\w/])llama\.cpp (?:pr|issue|pull request) #(\d+)", t)
    if m:
        n = int(m.group(1))
        return next((date for bound, date in LLAMACPP_THREAD_DATES if n <= bound), (2024, 7))
    return None


def versioned_engine(system: str, date: tuple[int, int] | None) -> str:
    """Engine family, with llama.cpp builds dated (source_date) before CUDA graphs kept apart ('llama.cpp-2023')."""
    fam = engine_family(system)
    if fam == "llama.cpp" and date is not None and date < LLAMACPP_GRAPHS:
        return "llama.cpp-2023"
    return fam


class Efficiencies:
    """Fitted factors keyed 'class' and 'class|engine'."""

    def __init__(self, table: dict[str, Eff] | None = None):
        self.table = dict(table or {})
        self._memo: dict[tuple[str, str], Eff] = {}  # get() results; calibration re-prices rows thousands of times

    def set(self, key: str, eff: Eff) -> None:
        """Replace one table entry (calibration's coordinate descent); forgets the memoised lookups."""
        self.table[key] = eff
        self._memo.clear()

    @classmethod
    def load(cls, path: Path | None = None) -> Efficiencies:
        p = Path(path or CALIBRATION_PATH)
        if not p.exists():
            return cls()
        with open(p) as f:
            raw = json.load(f)
        return cls({k: Eff(**v) for k, v in raw.get("factors", {}).items()})

    def get(self, hw_class: str, engine: str) -> Eff:
        got = self._memo.get((hw_class, engine))
        if got is None:
            got = self._memo[(hw_class, engine)] = self._lookup(hw_class, engine)
        return got

    def _lookup(self, hw_class: str, engine: str) -> Eff:
        cell = f"{hw_class}|{engine}"
        if cell in self.table:
            return self.table[cell]
        if cell in PRIORS:
            return PRIORS[cell]
        base = self.table.get(hw_class) or PRIORS.get(hw_class, DEFAULT)
        if engine in RATIO_CLASSES and hw_class not in RATIO_CLASSES[engine]:
            engine = ENGINE_PARENTS[engine]
        ratio = self.ratio(engine)
        return base.times(ratio) if ratio else base

    def ratio(self, engine: str) -> Eff | None:
        """An engine's ratio on the class factors, times its parent family's (llama.cpp-2023 -> llama.cpp)."""
        own = self.table.get(f"*|{engine}")
        parent = self.ratio(ENGINE_PARENTS[engine]) if engine in ENGINE_PARENTS else None
        if own is None or parent is None:
            return own or parent
        return Eff(*(getattr(own, k) * getattr(parent, k) for k in BOUNDS))

    def to_json(self) -> dict:
        return {k: asdict(v) for k, v in sorted(self.table.items())}
