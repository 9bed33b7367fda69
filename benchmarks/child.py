"""Runs one benchmark function in a fresh interpreter (so engines never share memory, caches or threads) and
returns the JSON it prints on its RESULT line, or {"error": the last stderr line}."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_child(module: str, fn: str, *args, env: dict | None = None, timeout: float | None = None,
              preexec_fn=None) -> dict:
    """`module.fn(*args)` (arguments as Python literals) in a subprocess; its return value, a JSON object."""
    code = (f"import json,sys; sys.path.insert(0, {str(ROOT)!r}); from {module} import {fn} as f; "
            f"print('RESULT', json.dumps(f(*{list(args)!r})))")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                           timeout=timeout, preexec_fn=preexec_fn, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (r.stderr.strip().splitlines() or [f"failed, rc {r.returncode}"])[-1]}
