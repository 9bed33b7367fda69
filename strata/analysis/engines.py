"""Inference engines as the field names them: which efficiency family calibration groups an engine in, its
version, the quantization it uses when a benchmark states none, and how it runs MoE layers and offloads.

An engine no pattern knows is the family "generic": its prediction is physics with the hardware class's factors
only, and says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# (name, pattern, family); first match wins, so wrappers come before the engine they wrap
ENGINES = (
    ("ktransformers", r"ktransformers", "ktransformers"),
    ("tensorrt-llm", r"tensorrt|trt-?llm", "trt-llm"),
    ("sglang", r"sglang", "vllm"),  # same kernels family (FlashInfer / fused MoE), same scheduler design
    ("vllm", r"vllm", "vllm"),
    ("fastertransformer", r"fastertransformer", "fastertransformer"),
    ("mlc-llm", r"\bmlc\b", "mlc"),
    ("exllama", r"exllama", "exllama"),
    ("moe-infinity", r"moe-?infinity", "moe-infinity"),
    ("mixtral-offloading", r"mixtral[- _]offloading", "mixtral-offloading"),
    ("mllm", r"\bmllm\b", "mllm"),
    ("mlx", r"\bmlx\b", "mlx"),
    ("transformers", r"transformers|accelerate|\bhf ", "transformers"),
    ("strata", r"strata", "strata"),
    ("powerinfer", r"powerinfer", "llama.cpp"),  # a llama.cpp fork
    ("ollama", r"ollama", "llama.cpp"),
    ("lm-studio", r"lm ?studio", "llama.cpp"),
    ("llamafile", r"llamafile", "llama.cpp"),
    ("ik_llama.cpp", r"ik_llama", "llama.cpp"),
    ("llama.cpp", r"llama\.?cpp|llama-bench|llama-server|\bggml\b", "llama.cpp"),
)
# Quantization an engine uses when a row states none, and where that fact comes from.
DEFAULT_QUANT = {
    "ollama": ("q4_k_m", ("Ollama library: a model's default tag is its Q4_K_M build (ollama.com/library, e.g. "
                          "llama3.1:8b = 8b-instruct-q4_K_M)")),
    "lm-studio": ("q4_k_m", "LM Studio's model search recommends the Q4_K_M file by default"),
    "mlx": ("mlx4", "mlx-community conversions and `mlx_lm.convert -q` default to 4-bit, group 64"),
}
# Engines whose MoE layer calls each touched expert's matrices in a loop (one kernel call per matrix per expert);
# llama.cpp (mul_mat_id), vLLM / SGLang / TensorRT-LLM (fused MoE) and the rest run a layer's experts in ~3 calls.
LOOPED_EXPERT_FAMILIES = {"strata", "transformers", "mixtral-offloading", "moe-infinity"}
# Engines that keep routed experts in host memory behind an expert cache on the GPU, fetching misses over the link
EXPERT_OFFLOAD_FAMILIES = {"mixtral-offloading", "moe-infinity"}
# transformers + accelerate (device_map="auto"): weights of layers placed on the CPU are copied to the GPU for
# every forward step (accelerate's hooks), whatever the number of tokens
STREAMING_OFFLOAD_FAMILIES = {"transformers"}
# Engines that run prompt matmuls on a phone's NPU (int8) and decode on its CPU (mllm-NPU)
NPU_PREFILL_FAMILIES = {"mllm"}


@dataclass(frozen=True)
class Engine:
    name: str  # canonical engine name ("ollama", "sglang", ...); "generic" when no pattern matched
    family: str  # efficiency group calibration fits ("llama.cpp", "vllm", ...)
    version: str | None = None
    text: str = ""

    @property
    def is_known(self) -> bool:
        return self.family != "generic"

    def describe(self) -> str:
        if not self.is_known:
            return (f"engine {self.text!r} unknown: physics-only prediction with the hardware class's factors"
                    if self.text.strip() else "no engine named: physics-only prediction with the class's factors")
        v = f" {self.version}" if self.version else ""
        fam = f" (efficiency family {self.family})" if self.family != self.name else ""
        return f"engine {self.name}{v}{fam}"


def identify(text: str) -> Engine:
    """Engine named in a free-text system column or an --engine flag ('vLLM 0.19.0 (TP2)', 'Ollama', 'sglang')."""
    t = text.lower()
    for name, pat, family in ENGINES:
        m = re.search(pat, t)
        if m:
            # the version right after the name, past a suffix word ('mlx-lm 0.22', 'TensorRT-LLM 0.12')
            v = re.match(r"[^\w(]*(?:[a-z]+)?[\s-]*v?(\d+(?:\.\d+){1,2}|b\d{3,5})\b", t[m.end():])
            return Engine(name, family, v.group(1) if v else None, text)
    return Engine("generic", "generic", None, "" if t.strip() in {"generic", ""} else text)


def default_quant(engine: Engine) -> tuple[str, str] | None:
    """(format, source) an engine uses when nothing is stated; None where it has no single default."""
    return DEFAULT_QUANT.get(engine.name)
