"""Run statistics for `generate --stats-json` and the Python API (tiers add expert/disk counters)."""

from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    # Linux: VmHWM belongs to this program's address space; ru_maxrss survives exec and so reports the
    # launching process's RSS when a large parent (a test runner, a benchmark) forked us.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024


def run_stats(llm, elapsed_s: float) -> dict:
    s = dict(llm.last_stats)
    s.setdefault("generated_tokens", 0)
    s["elapsed_s"] = elapsed_s
    s["tokens_per_s"] = s["generated_tokens"] / elapsed_s if elapsed_s > 0 else 0.0
    tier = getattr(llm.engine, "tier_stats", None)
    extra = tier() if callable(tier) else {}
    s.update({
        "expert_hit_rate": extra.get("expert_hit_rate"),
        "prefetch_coverage": extra.get("prefetch_coverage"),
        "prefetch_waste_bytes": extra.get("prefetch_waste_bytes", 0),
        "disk_bytes_read": extra.get("disk_bytes_read", 0),
        "io_stall_s": extra.get("io_stall_s", 0.0),
        "peak_rss_bytes": peak_rss_bytes(),
    })
    s.update({k: v for k, v in extra.items() if k not in s})
    spec = getattr(llm.engine, "spec", None)
    s.update(spec.stats() if spec else {"spec_acceptance_rate": None, "spec_mean_accepted_tokens": None})
    return s
