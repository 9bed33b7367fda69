"""Weights that are views of a safetensors file mapping (the loader keeps them so: no second copy in RSS).

`file_ranges` lists this process's file-backed mappings; `page_range` gives the whole pages of a tensor that
lies inside one; `read_in` reads such weights into the page cache at load, one byte per page.

Without `read_in`, a model loaded with its files out of the page cache reads each weight page from disk the
first time a request touches it: measured on an 8-layer OLMoE (6.6 GB, 1 thread), the first request after such
a load prefilled 16 tokens in 1.8 s instead of 0.3 s and took 75-210 ms for each of its first 8 decode steps
instead of 45-50 ms (docs/benchmarks.md). Read at load, the first request runs at steady speed; the
pass alone took 1.9 s from a cold cache and 0.3 s warm, and the cold load as a whole stayed ~11.5 s.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import sys
from collections.abc import Iterable
from functools import lru_cache

import psutil
import torch
from tqdm import tqdm


@lru_cache(maxsize=1)
def libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def file_ranges() -> list[tuple[int, int]]:
    """(start, end) of this process's file-backed mappings, sorted; empty where /proc is not there."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[4] != "0" and parts[5].startswith("/"):  # inode, path: a file
                    lo, hi = parts[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return sorted(ranges)


def page_range(t: torch.Tensor, ranges: list[tuple[int, int]], whole: bool = True) -> tuple[int, int] | None:
    """Page-aligned (lo, hi) of `t` when it lies inside one of `ranges`: the pages wholly inside the tensor
    (`whole`), or every page it touches; None for anonymous memory, other devices and empty tensors."""
    if not ranges or t.device.type != "cpu" or t.numel() == 0:
        return None
    page = mmap.PAGESIZE
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    i = bisect.bisect_right(ranges, (start, float("inf"))) - 1
    if i < 0 or not (ranges[i][0] <= start and end <= ranges[i][1]):
        return None
    lo, hi = (-(-start // page) * page, end // page * page) if whole else (start // page * page, -(-end // page) * page)
    return (lo, hi) if hi > lo else None


def read_in(tensors: Iterable[torch.Tensor], progress: bool = False) -> int:
    """Reads the file-backed pages under `tensors` now (one byte per page), where they fit in the memory available.
    Returns the bytes read in (0 when skipped)."""
    ranges = file_ranges()
    spans: list[list[int]] = []  # merged: views of the same pages are read once
    for lo, hi in sorted(r for t in tensors if (r := page_range(t, ranges, whole=False)) is not None):
        if spans and lo <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], hi)
        else:
            spans.append([lo, hi])
    total = sum(hi - lo for lo, hi in spans)
    if not total or total > psutil.virtual_memory().available:
        return 0  # a mapping larger than memory stays lazy: reading it all would only evict itself
    page, chunk = mmap.PAGESIZE, 256 << 20
    with tqdm(total=total, desc="reading in", unit="B", unit_scale=True, disable=not progress, file=sys.stderr,
              leave=False) as bar:
        for lo, hi in spans:
            for a in range(lo, hi, chunk):
                b = min(a + chunk, hi)
                buf = (ctypes.c_uint8 * (b - a)).from_address(a)
                torch.frombuffer(buf, dtype=torch.uint8)[::page].sum()  # one read per page: the fault reads it in
                bar.update(b - a)
    return total
