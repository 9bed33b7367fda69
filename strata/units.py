"""Byte sizes on the command line: one parser and one formatter for every flag that takes a size.

Units: B; KiB/MiB/GiB/TiB (binary); KB/MB/GB/TB (decimal); bare K/M/G/T mean KiB/MiB/GiB/TiB, as `free -g`
and most memory flags read them. Case-insensitive; a plain number is bytes.
"""

from __future__ import annotations

import re

UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
         "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*")
RULE = "K/M/G/T and KiB/MiB/GiB/TiB are binary (4G = 4GiB = 4096MiB), KB/MB/GB/TB decimal, a bare number bytes"
EXPECTED = "a number with an optional unit (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB; K/M/G/T mean KiB/MiB/GiB/TiB)"


def parse_size(text: str | int) -> int:
    """'3GiB', '3G' -> 3221225472; '512MB' -> 512000000; '4096' -> 4096. ValueError when it does not parse;
    callers turn that into their own one-line error naming the flag."""
    if isinstance(text, int):
        return text
    m = _SIZE.fullmatch(str(text))
    if not m or m[2].lower() not in UNITS:
        raise ValueError(f"expected {EXPECTED}, got {text!r}")
    return int(float(m[1]) * UNITS[m[2].lower()])


def format_size(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
