"""Hardware catalog (hardware.json) and systems built from it: a device, optional GPU count, optional host CPU.

A system is written `DEVICE[+HOST]` with an optional `Nx` count on the device, e.g. `h100-sxm`, `2xh100-sxm`,
`rtx4090+xeon-6454s`, or a path to a probe profile JSON (see probe.py). Free-text hardware descriptions from
published tables ('1x RTX 4090D 24GB + 2x Intel Xeon Gold 6454S') are matched by alias.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from strata.analysis.precision import STRATA_FORMATS
from strata.errors import ConfigError

CATALOG_PATH = Path(__file__).with_name("hardware.json")
# Which peak a compute precision falls back to when a device lists no figure for it.
FALLBACK = {"fp16_acc16": "fp16", "amx_int8": "int8", "npu_int8": "int8", "fp4": "fp8", "fp8": "int8", "int8": "fp16", "fp16": "fp32", "fp32": "fp16"}


@dataclass
class Device:
    key: str
    name: str
    cls: str
    peak_tflops: dict[str, float]
    memory_gb: float
    bandwidth_gbs: float
    link_gbs: float = 25.0
    nvlink_gbs: float = 0.0
    power_w: float = 0.0
    idle_w: float = 0.0
    flash: dict | None = None
    tiers: list[dict] = field(default_factory=list)
    in_flash_compute: bool = False
    approximate: bool = False
    source: str = ""
    kernel_eff: dict[str, float] = field(default_factory=dict)  # Strata's GEMV rate per format / bandwidth_gbs
    # Strata's prefill matmul on quantized weights is a bf16 GEMM plus an expand pass over row tiles; that pass's
    # rate in G weights/s per format with the tile in cache (probe: the pass timed on a 2048 x 2048 matrix)
    dequant_gelem_s: dict[str, float] = field(default_factory=dict)
    llc_mb: float = 0.0  # last-level cache (MiB; 0 = not known): decides whether an expanded tile stays in cache
    # share of bandwidth_gbs a bf16 matmul of M activation rows streams its weights at (M > 1; probe: rotating weights
    # at 16 rows and at the GEMM row count): few-row matmuls read weights well below a GEMV's rate
    gemm_eff: dict[int, float] = field(default_factory=dict)
    # share of the memory bandwidth these cores can draw where they share an SoC's memory with a GPU (Apple M-series
    # CPU cores: the fabric gives the CPU cluster a part of it); the stated memory figure stays bandwidth_gbs
    cpu_bw_share: float = 1.0
    sockets: int = 1  # CPU sockets whose bandwidth and FLOPs are summed here (each with its own memory)
    # a hybrid CPU's core types ({cores, threads per core, ghz, flops_per_cycle} each; their sum is the fp32 peak):
    # where an engine splits work evenly over its threads, the slowest thread sets the pace
    core_types: list[dict] = field(default_factory=list)
    # Strata's host costs measured on this machine by `strata probe` (host_probe.py): overhead_us_per_call,
    # loop_us_per_expert_call, prefill_loop_us_per_expert_call; empty: strata_fit.json's development-machine figures
    strata_host: dict[str, float] = field(default_factory=dict)

    def peak(self, kind: str) -> float:
        """Peak FLOP/s for a compute precision (falls back along FLOPs-per-cycle-equivalent precisions)."""
        seen = set()
        k = kind
        while k not in self.peak_tflops and k not in seen:
            seen.add(k)
            k = FALLBACK.get(k, "fp16")
        return self.peak_tflops.get(k, 1e-3) * 1e12

    def gemm_eff_at(self, rows: float) -> float:
        """gemm_eff at `rows` (between the measured row counts, held flat outside them); 0 if unmeasured."""
        return loglog(self.gemm_eff, rows) if self.gemm_eff and rows > 1 else 0.0

    @property
    def tensor_cores(self) -> bool:
        """Matrix units for fp16 (tensor cores): an fp16 matmul peak well above the fp32 one (Pascal's is not)."""
        return self.peak("fp16") > 1.5 * self.peak("fp32")

    def even_split_share(self) -> float:
        """Share of the peak FLOP rate reached when every hardware thread gets the same work (1 for uniform cores):
        all threads wait for the slowest (an E-core's, or a P-core's half when two threads share it)."""
        if not self.core_types:
            return 1.0
        rates = [t["ghz"] * t["flops_per_cycle"] for t in self.core_types]  # GFLOP/s per core
        threads = sum(t["cores"] * t["threads"] for t in self.core_types)
        slowest = min(r / t["threads"] for r, t in zip(rates, self.core_types))
        return threads * slowest / sum(r * t["cores"] for r, t in zip(rates, self.core_types))

    @property
    def bw(self) -> float:
        return self.bandwidth_gbs * self.cpu_bw_share * 1e9

    def flash_bw(self, read_bytes: float) -> float:
        """Storage read bandwidth at a read size: size / (latency + size / sequential bandwidth)."""
        if not self.flash:
            return 0.0
        seq = self.flash["bw_gbs"] * 1e9
        lat = self.flash.get("latency_us", 100) * 1e-6
        return read_bytes / (lat + read_bytes / seq) if read_bytes > 0 else seq


@dataclass
class System:
    device: Device
    count: int = 1
    host: Device | None = None
    parallel: str = "tp"  # "tp" (tensor parallel) or "pp" (layer split: one device active at a time)
    notes: list[str] = field(default_factory=list)  # which catalog entries the names resolved to, assumptions

    @property
    def label(self) -> str:
        n = f"{self.count}x " if self.count > 1 else ""
        return n + self.device.name + (f" + {self.host.name}" if self.host else "")


def load_catalog() -> dict[str, Device]:
    with open(CATALOG_PATH) as f:
        raw = json.load(f)
    return {k: device_from_dict(k, v) for k, v in raw.items() if not k.startswith("_")}


def loglog(table: dict[float, float], x: float) -> float:
    """A kernel figure measured at a few sizes, at size `x`: log-log interpolation between the measured sizes
    around it, the nearest measured value outside them."""
    lo = max((m for m in table if m <= x), default=min(table))
    hi = min((m for m in table if m >= x), default=max(table))
    if lo == hi:
        return table[lo]
    w = math.log(x / lo) / math.log(hi / lo)
    return math.exp((1 - w) * math.log(table[lo]) + w * math.log(table[hi]))


STRATA_HOST_KEYS = ("overhead_us_per_call", "loop_us_per_expert_call", "prefill_loop_us_per_expert_call")


def device_from_dict(key: str, v: dict) -> Device:
    try:
        return Device(key=key, name=v["name"], cls=v["class"], peak_tflops=dict(v["peak_tflops"]),
                      memory_gb=float(v["memory_gb"]), bandwidth_gbs=float(v["bandwidth_gbs"]),
                      link_gbs=float(v.get("link_gbs", 25.0)), nvlink_gbs=float(v.get("nvlink_gbs", 0.0)),
                      power_w=float(v.get("power_w", 0.0)), idle_w=float(v.get("idle_w", 0.0)),
                      flash=v.get("flash"), tiers=list(v.get("tiers", [])),
                      in_flash_compute=bool(v.get("in_flash_compute", False)),
                      approximate=bool(v.get("approximate", False)), source=v.get("source", ""),
                      kernel_eff=dict(v.get("kernel_eff") or _probed_kernel_eff(v)),
                      dequant_gelem_s=dict(v.get("dequant_gelem_s") or _probed(v, r"^dequant_strata_(.+)_gelem_s$")),
                      llc_mb=float(v.get("llc_mb", 0.0)), cpu_bw_share=float(v.get("cpu_bw_share", 1.0)),
                      gemm_eff={int(k): float(x) for k, x in (v.get("gemm_eff") or {}).items()},
                      core_types=list(v.get("core_types", [])),
                      strata_host={k: float(x) for k, x in (v.get("strata_host") or {}).items()
                                   if k in STRATA_HOST_KEYS})
    except KeyError as e:
        raise ConfigError(f"hardware entry {key!r}: missing field {e.args[0]!r}") from None


def _probed(v: dict, pattern: str) -> dict[str, float]:
    """Probe kernel figures whose key matches `pattern` (group 1: a Strata format name), by weight format."""
    out = {}
    for key, x in (v.get("kernels") or {}).items():
        m = re.match(pattern, key)
        if m and m.group(1) in STRATA_FORMATS and float(x) > 0:
            out[STRATA_FORMATS[m.group(1)]] = float(x)
    return out


def _probed_kernel_eff(v: dict) -> dict[str, float]:
    """Share of the probed bandwidth each of Strata's decode GEMVs reaches (probe key gemv_strata_<fmt>_gbs)."""
    bw = float(v.get("bandwidth_gbs", 0.0))
    if bw <= 0:
        return {}
    return {f: min(gbs / bw, 1.0) for f, gbs in _probed(v, r"^gemv_strata_(.+)_gbs$").items()}


def aliases() -> dict[str, list[str]]:
    with open(CATALOG_PATH) as f:
        raw = json.load(f)
    return {k: [k, v["name"], *v.get("aliases", [])] for k, v in raw.items() if not k.startswith("_")}


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def _words(s: str) -> str:
    return " " + re.sub(r"[^a-z0-9]+", " ", s.lower()).strip() + " "


FUZZY_CUTOFF = 0.8  # similarity (difflib ratio) below which a name matches no entry


def resolve_device(text: str) -> tuple[str | None, str]:
    """(catalog key, how it matched): the longest alias that occurs in `text` (case and punctuation ignored;
    aliases of 4 characters or fewer only as whole words, so 'L4' does not match inside 'L40S'), else the closest
    name by similarity above FUZZY_CUTOFF; (None, '') when nothing is close."""
    t, words = _norm(text), _words(text)
    best, best_len, via = None, 0, ""
    table = aliases()
    for key, names in table.items():
        for n in names:
            a = _norm(n)
            if a and a in t and len(a) > best_len and (len(a) > 4 or _words(n) in words):
                best, best_len, via = key, len(a), n
    if best is not None:
        return best, f"alias {via!r}"
    score, key, name = max((difflib.SequenceMatcher(None, t, _norm(n)).ratio(), k, n)
                           for k, names in table.items() for n in names)
    if score >= FUZZY_CUTOFF:
        return key, f"closest name {name!r} (similarity {score:.2f})"
    return None, ""


def match_device(text: str) -> str | None:
    """Catalog key for a free-text device name (resolve_device without the explanation)."""
    return resolve_device(text)[0]


def _stated_memory(text: str) -> float | None:
    """Memory size written in a device description ('Apple M3 Max (40-core GPU) 64GB', '128GB DDR5')."""
    m = re.search(r"(\d+(?:\.\d+)?)\s*(gb|tb)\b", text.lower())
    return float(m.group(1)) * (1000 if m.group(2) == "tb" else 1) if m else None


def parse_system(text: str) -> System:
    """A system from `[Nx]DEVICE[+HOST]` (catalog keys, free text or an ad-hoc spec, see hwspec.py) or a probe
    profile JSON path. Its notes say which entry each name resolved to."""
    from strata.analysis.hwspec import is_spec, parse_spec

    cat = load_catalog()
    if text.endswith(".json") and os.path.exists(text):
        with open(text) as f:
            prof = json.load(f)
        return System(device_from_dict(prof.get("key", "probe"), prof), notes=[f"hardware: probe profile {text}"])
    if is_spec(text):
        dev, notes = parse_spec(text)
        return System(dev, notes=[f"hardware: {dev.name} from the spec", *notes])
    parts = [p.strip() for p in re.split(r"\s\+\s|\+", text) if p.strip()]
    devs: list[tuple[int, Device]] = []
    notes = []
    for p in parts:
        m = re.match(r"^\s*(\d+)\s*x\s*(.*)$", p, re.IGNORECASE)
        count, body = (int(m.group(1)), m.group(2)) if m else (1, p)
        key, how = (body, "catalog key") if body in cat else resolve_device(body)
        if key is None:
            raise ConfigError(f"--hardware {text!r}: no catalog entry matches {body!r}; see `strata analyze "
                              "--list-hardware`, or give a spec like 'mem_bw=800GB/s,bf16=100TFLOPS,mem=64GB'")
        dev = cat[key]
        mem = _stated_memory(body)
        if mem and dev.cls != "gpu" and mem != dev.memory_gb:  # unified / host memory is a configuration choice
            dev = Device(**{**dev.__dict__, "memory_gb": mem})
        if how != "catalog key":
            notes.append(f"hardware {body!r} -> {key} ({dev.name}; {how})")
        devs.append((count, dev))
    count, dev = devs[0]
    host = devs[1][1] if len(devs) > 1 else None
    if host is not None and devs[1][0] > 1:  # several host sockets: capacity and bandwidth add up
        n = devs[1][0]
        host = Device(**{**host.__dict__, "memory_gb": host.memory_gb * n, "bandwidth_gbs": host.bandwidth_gbs * n,
                         "peak_tflops": {k: v * n for k, v in host.peak_tflops.items()},
                         "power_w": host.power_w * n, "idle_w": host.idle_w * n, "sockets": n})
    return System(dev, count=count, host=host, notes=notes)
