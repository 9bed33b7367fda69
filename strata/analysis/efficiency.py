"""Efficiency factors: the fraction of peak bandwidth / FLOPs an engine reaches on a hardware class, plus a
fixed per-layer step overhead (kernel launches, synchronisation, framework loop).

Priors are physical guesses stated once here; `calibration.json` (written by calibrate.py) holds the fitted
values per hardware class and per (class, engine). Lookup falls back engine -> class -> prior.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

CALIBRATION_PATH = Path(__file__).with_name("calibration.json")
BOUNDS = {"eta_bw": (0.05, 1.0), "eta_flops": (0.02, 1.0), "overhead_us": (0.0, 1000.0)}


@dataclass
class Eff:
    eta_bw: float  # achieved / peak memory bandwidth for streaming weights and KV
    eta_flops: float  # achieved / peak FLOP/s for matmuls with many tokens
    overhead_us: float  # fixed time per layer per forward step

    def clamp(self) -> Eff:
        return Eff(*(min(max(getattr(self, k), lo), hi) for k, (lo, hi) in BOUNDS.items()))


PRIORS = {
    "gpu": Eff(0.75, 0.5, 20.0),
    "apple": Eff(0.7, 0.5, 30.0),
    "cpu-x86": Eff(0.6, 0.3, 30.0),
    "cpu-server": Eff(0.5, 0.3, 50.0),
    "cpu-arm": Eff(0.5, 0.3, 50.0),
    "cpu-measured": Eff(0.9, 0.8, 20.0),  # probe ceilings are already achieved figures
    "design": Eff(0.9, 0.7, 0.0),  # simulated designs report ideal pipelines
}
DEFAULT = Eff(0.6, 0.4, 30.0)

ENGINE_PATTERNS = [
    ("ktransformers", r"ktransformers"),
    ("trt-llm", r"tensorrt"),
    ("vllm", r"vllm|sglang"),
    ("fastertransformer", r"fastertransformer"),
    ("mlc", r"\bmlc\b"),
    ("exllama", r"exllama"),
    ("transformers", r"transformers|hf "),
    ("strata", r"strata"),
    ("llama.cpp", r"llama\.?cpp|ollama|llamafile|ik_llama|powerinfer"),
]


def engine_family(text: str) -> str:
    t = text.lower()
    for name, pat in ENGINE_PATTERNS:
        if re.search(pat, t):
            return name
    return "generic"


MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
LLAMACPP_GRAPHS = (2024, 5)  # llama.cpp gained CUDA graphs (far fewer launches per token) around May 2024


def source_date(text: str) -> tuple[int, int] | None:
    """Earliest (year, month) written in a source/notes string, if any."""
    t = text.lower()
    found = [(int(y), int(m)) for y, m in re.findall(r"\b(20\d\d)-(\d\d)\b", t)]
    found += [(int(y), MONTHS.index(m[:3]) + 1) for m, y in re.findall(r"\b([a-z]{3})[a-z]* (20\d\d)\b", t)
              if m[:3] in MONTHS]
    return min(found) if found else None


def versioned_engine(system: str, source: str) -> str:
    """Engine family, with llama.cpp builds dated before CUDA graphs kept apart ('llama.cpp-2023')."""
    fam = engine_family(system)
    date = source_date(source)
    if fam == "llama.cpp" and date is not None and date < LLAMACPP_GRAPHS:
        return "llama.cpp-2023"
    return fam


class Efficiencies:
    """Fitted factors keyed 'class' and 'class|engine'."""

    def __init__(self, table: dict[str, Eff] | None = None):
        self.table = dict(table or {})

    @classmethod
    def load(cls, path: Path | None = None) -> Efficiencies:
        p = Path(path or CALIBRATION_PATH)
        if not p.exists():
            return cls()
        with open(p) as f:
            raw = json.load(f)
        return cls({k: Eff(**v) for k, v in raw.get("factors", {}).items()})

    def get(self, hw_class: str, engine: str) -> Eff:
        for key in (f"{hw_class}|{engine}", hw_class):
            if key in self.table:
                return self.table[key]
        return PRIORS.get(hw_class, DEFAULT)

    def to_json(self) -> dict:
        return {k: asdict(v) for k, v in sorted(self.table.items())}
