"""Ad-hoc hardware for machines the catalog lacks: `--hardware "mem_bw=800GB/s,bf16=100TFLOPS,mem=64GB,cores=16"`.

Fields (comma-separated `name=value`, units optional):
  mem_bw   memory bandwidth (GB/s by default; TB/s, MB/s)       required
  bf16 / fp16 / fp32 / fp8 / int8 / fp4
           dense peak (TFLOPS by default; PFLOPS, GFLOPS, TOPS)   one of them, or cores
  mem      memory capacity (GB by default; GiB, TB, MB)          default 16 GB
  cores    CPU cores: without a peak, fp32 = cores x 3 GHz x 32 FLOPs/cycle (AVX2-class FMA), stated as assumed
  class    gpu, apple, cpu-x86, cpu-arm or cpu-server             default gpu, or cpu-x86 when only cores are given
  link     host link (GB/s), power (W), name
"""

from __future__ import annotations

import re

from strata.analysis.hardware import Device
from strata.errors import ConfigError

CLASSES = ("gpu", "apple", "cpu-x86", "cpu-arm", "cpu-server")
PEAKS = ("bf16", "fp16", "fp32", "fp8", "int8", "fp4")
_SCALE = {
    "bw": {"": 1.0, "gb/s": 1.0, "gbs": 1.0, "gbps": 1.0, "tb/s": 1e3, "tbs": 1e3, "mb/s": 1e-3, "gib/s": 1.073741824},
    "flops": {"": 1.0, "tflops": 1.0, "tops": 1.0, "tflop/s": 1.0, "pflops": 1e3, "pops": 1e3, "gflops": 1e-3,
              "gops": 1e-3},
    "size": {"": 1.0, "gb": 1.0, "g": 1.0, "gib": 1.073741824, "tb": 1e3, "t": 1e3, "mb": 1e-3, "m": 1e-3},
    "watts": {"": 1.0, "w": 1.0, "kw": 1e3},
}
_EXAMPLE = {"bw": "800GB/s", "flops": "100TFLOPS", "size": "64GB", "watts": "300W"}
CPU_GHZ, CPU_FLOPS_PER_CYCLE = 3.0, 32  # assumed for a CPU given only its core count


def _number(field: str, value: str, kind: str, spec: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z/]*)\s*", value.lower())
    if not m or m.group(2) not in _SCALE[kind]:
        raise ConfigError(f"--hardware {spec!r}: field '{field}' expects a number like {_EXAMPLE[kind]}, "
                          f"got {value!r}")
    v = float(m.group(1)) * _SCALE[kind][m.group(2)]
    if v <= 0:
        raise ConfigError(f"--hardware {spec!r}: field '{field}' must be > 0, got {value!r}")
    return v


def is_spec(text: str) -> bool:
    return "=" in text


def parse_spec(spec: str) -> tuple[Device, list[str]]:
    """A Device from an ad-hoc spec, with the assumptions it made; one-line ConfigError naming a bad field."""
    fields: dict[str, str] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ConfigError(f"--hardware {spec!r}: expected name=value, got {part.strip()!r}")
        k, v = (x.strip() for x in part.split("=", 1))
        fields[k.lower()] = v
    known = {"mem_bw", "bw", "bandwidth", "mem", "memory", "cores", "class", "link", "power", "name", *PEAKS}
    for k in fields:
        if k not in known:
            raise ConfigError(f"--hardware {spec!r}: unknown field '{k}'; expected {', '.join(sorted(known))}")
    bw_key = next((k for k in ("mem_bw", "bw", "bandwidth") if k in fields), None)
    if bw_key is None:
        raise ConfigError(f"--hardware {spec!r}: field 'mem_bw' is required (memory bandwidth, e.g. mem_bw=800GB/s)")
    notes = []
    bw = _number(bw_key, fields[bw_key], "bw", spec)
    peaks = {("fp16" if k == "bf16" else k): _number(k, fields[k], "flops", spec) for k in PEAKS if k in fields}
    cores = 0
    if "cores" in fields:
        if not re.fullmatch(r"\s*\d+\s*", fields["cores"]) or int(fields["cores"]) <= 0:
            raise ConfigError(f"--hardware {spec!r}: field 'cores' expects a positive integer, got {fields['cores']!r}")
        cores = int(fields["cores"])
    cls = fields.get("class", "cpu-x86" if cores and not peaks else "gpu").lower()
    if cls not in CLASSES:
        raise ConfigError(f"--hardware {spec!r}: field 'class' expects one of {', '.join(CLASSES)}, got {cls!r}")
    if not peaks:
        if not cores:
            raise ConfigError(f"--hardware {spec!r}: field 'bf16' (or fp16/fp32/fp8/int8, or 'cores') is required: "
                              "a compute peak, e.g. bf16=100TFLOPS")
        peaks["fp32"] = cores * CPU_GHZ * CPU_FLOPS_PER_CYCLE / 1e3
        notes.append(f"ad-hoc hardware: fp32 peak {peaks['fp32']:.2f} TFLOPS assumed from {cores} cores "
                     f"x {CPU_GHZ} GHz x {CPU_FLOPS_PER_CYCLE} FLOPs/cycle")
    mem = _number("mem", fields.get("mem", fields.get("memory", "16GB")), "size", spec)
    if "mem" not in fields and "memory" not in fields:
        notes.append("ad-hoc hardware: memory 16 GB assumed (give mem=...)")
    dev = Device(key="adhoc", name=fields.get("name", f"ad-hoc {cls} ({bw:g} GB/s)"), cls=cls, peak_tflops=peaks,
                 memory_gb=mem, bandwidth_gbs=bw,
                 link_gbs=_number("link", fields["link"], "bw", spec) if "link" in fields else 25.0,
                 power_w=_number("power", fields["power"], "watts", spec) if "power" in fields else 0.0,
                 source=f"ad-hoc spec {spec!r}")
    return dev, notes
