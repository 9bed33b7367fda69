"""Time of one forward step on a System: operators placed on processors (device, host CPU, flash), each on a
roofline max(FLOPs / (eta_f * peak), bytes / (eta_bw * bandwidth)), plus link and flash transfers and a fixed
overhead per kernel call. Weight bytes of dequantizing formats (GGUF blocks, int4 groups, weight-only int8) stream
at eta_bw * eta_q; on a probed machine, Strata's weights stream at the GEMV rate the probe measured per format. Where weights live is a Placement (placement.py); this file only prices it.

A StepCost keeps the per-operator arrays so calibration can re-price it under new efficiency factors cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from strata.analysis.efficiency import NUMA_AWARE_ENGINES, Efficiencies
from strata.analysis.hardware import Device
from strata.analysis.precision import needs_dequant


@dataclass
class Segment:
    """Operators that run on one processor."""

    proc: str  # "device", "host" or "flash" (in-flash compute)
    dev: Device
    engine: str
    names: list[str] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)
    bytes: list[float] = field(default_factory=list)  # all bytes, weights included
    wbytes: list[float] = field(default_factory=list)  # weight bytes that go through a GEMV kernel of `fmts`
    fmts: list[str] = field(default_factory=list)
    peaks: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # a measured floor on the op's time (probe kernel figures)
    rates: list[float] = field(default_factory=list)  # measured share of bandwidth its weights stream at (0: by fmt)
    launches: float = 0.0  # kernel calls per step on this processor (each pays overhead_us)
    host_s: float = 0.0  # measured host time per step outside the calls' overhead (Strata's Python expert loop)
    # NUMA: whether each socket reads a copy of the weights in its own memory (None: the engine's rule,
    # efficiency.NUMA_AWARE_ENGINES); otherwise one socket's memory controllers serve every read
    numa_local: bool | None = None
    bw_scale: float = 1.0  # tensor parallel: devices share the bytes
    flops_scale: float = 1.0
    # per op, the kernel library whose matmul FLOPs share prices it where it is not the engine's own ("" = the
    # engine's): llama.cpp hands 16-bit GEMMs to cuBLAS
    libraries: list[str] = field(default_factory=list)

    def add(self, name: str, flops: float, nbytes: float, peak: float, wbytes: float = 0.0, fmt: str = "",
            launches: float = 0.0, seconds: float = 0.0, rate: float = 0.0, library: str = "") -> None:
        self.names.append(name)
        self.libraries.append(library)
        self.seconds.append(seconds)
        self.rates.append(rate)
        self.flops.append(flops)
        self.bytes.append(nbytes)
        self.wbytes.append(min(wbytes, nbytes) if fmt else 0.0)
        self.fmts.append(fmt)
        self.peaks.append(peak)
        self.launches += launches

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        # cached: calibration re-prices the same segment thousands of times
        if getattr(self, "_cache", None) is None or len(self._cache[0]) != len(self.flops):
            bw = (self.dev.flash_bw(1 << 30) if self.proc == "flash" else self.dev.bw) * self.bw_scale
            local = self.engine in NUMA_AWARE_ENGINES if self.numa_local is None else self.numa_local
            if self.dev.sockets > 1 and not local:
                bw /= self.dev.sockets  # pages on one node: one socket's memory controllers serve every read
            f = np.asarray(self.flops) / (np.asarray(self.peaks) * self.flops_scale)
            w = np.asarray(self.wbytes)
            other = (np.asarray(self.bytes) - w) / bw
            measured = np.array([r or (self.dev.kernel_eff.get(m, 0.0) if self.engine == "strata" else 0.0)
                                 for m, r in zip(self.fmts, self.rates)])
            deq = np.array([bool(m) and needs_dequant(m) for m in self.fmts], dtype=bool)
            # weight bytes: at a measured kernel rate (probe: Strata's own GEMVs) when there is one, else plain
            # (eta_bw) or dequantizing (eta_bw * eta_q); the last two are split so factors can be re-priced
            w_meas = np.where(measured > 0, w / (np.maximum(measured, 1e-9) * bw), 0.0)
            w_plain = np.where((measured == 0) & ~deq, w / bw, 0.0)
            w_deq = np.where((measured == 0) & deq, w / bw, 0.0)
            self._cache = (f, other + w_plain, w_deq, w_meas, np.asarray(self.seconds))
            libs = np.asarray(self.libraries)
            self._libraries = {lib: libs == lib for lib in set(self.libraries) - {""}}
        return self._cache

    def op_times(self, effs: Efficiencies) -> tuple[np.ndarray, np.ndarray]:
        """(compute, memory) seconds per op; a measured op time counts as compute (it is a kernel's own rate)."""
        e = effs.get(self.dev.cls, self.engine)
        f, plain, deq, meas, sec = self._arrays()
        eta_f = e.eta_flops
        if self._libraries:
            eta_f = np.full(len(f), e.eta_flops)
            for lib, mask in self._libraries.items():
                eta_f[mask] = effs.get(self.dev.cls, lib).eta_flops
        return np.maximum(f / eta_f, sec), plain / e.eta_bw + deq / (e.eta_bw * e.eta_q) + meas

    def time(self, effs: Efficiencies) -> float:
        if not self.flops:
            return 0.0
        f, b = self.op_times(effs)
        e = effs.get(self.dev.cls, self.engine)
        overhead = e.overhead_us
        if self.engine == "strata" and "overhead_us_per_call" in self.dev.strata_host:
            overhead = self.dev.strata_host["overhead_us_per_call"]  # probed on this machine
        return float(np.maximum(f, b).sum()) + self.launches * overhead * 1e-6 + self.host_s


@dataclass
class StepCost:
    segments: list[Segment]
    link_s: float = 0.0  # host -> device weight transfers (PCIe), already in seconds
    flash_s: float = 0.0  # storage reads, seconds
    comm_s: float = 0.0  # tensor-parallel all-reduces
    overlap: float = 0.0  # fraction of transfers hidden behind compute (prefetch)
    tokens: int = 1
    seqs: int = 1  # sequences in the step: the engine's host loop spends seq_us on each, overlapped with the device

    def time(self, effs: Efficiencies) -> float:
        compute = sum(s.time(effs) for s in self.segments) + self.comm_s
        xfer = self.link_s + self.flash_s
        device = max(compute, self.overlap * xfer) + (1.0 - self.overlap) * xfer
        lead = self.segments[0]
        return max(device, self.seqs * effs.get(lead.dev.cls, lead.engine).seq_us * 1e-6)

    def breakdown(self, effs: Efficiencies) -> dict[str, float]:
        out = {s.proc: s.time(effs) for s in self.segments}
        out.update(link=self.link_s, flash=self.flash_s, comm=self.comm_s)
        return out

    def energy_j(self, effs: Efficiencies) -> float:
        """Busy processors at board power, the rest of the step at idle power."""
        total = self.time(effs)
        energy, seen = 0.0, set()
        for s in self.segments:
            busy = s.time(effs)
            energy += s.dev.power_w * busy
            if s.dev.key not in seen:
                energy += s.dev.idle_w * max(total - busy, 0.0)
                seen.add(s.dev.key)
        return energy
