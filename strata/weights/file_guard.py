"""Model files changed or truncated under a running process: one clear line and exit code 75, not a silent SIGBUS.

Weights are views of the safetensors file mappings (loader.py): a file truncated under the process makes
the next read of a weight fault with SIGBUS, which kills it with no word, and a file rewritten in place
changes weights under running requests. `guard_model_files(path)` (used by `strata serve` and `strata
generate`) does two things:

- a SIGBUS handler (sigbus_guard.c, built once into the cache directory like the kernels) that writes
  `strata: SIGBUS reading FILE: ...` to stderr, naming the file whose mapping faulted, and exits with
  EXIT_MODEL_FILE_CHANGED;
- a daemon thread that compares each file's size and mtime with those seen at load every `interval_s` and,
  when the same file (inode) changed in place, logs the same kind of line and exits with the same code. A
  file removed or renamed over only gets a warning: the mapping keeps the old inode, the weights stay intact.

Without a C compiler only the timer runs (logged once).
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from strata.layers.quant_native import compile_library, find_compiler

log = logging.getLogger("strata.weights")
EXIT_MODEL_FILE_CHANGED = 75
SOURCE = Path(__file__).with_name("sigbus_guard.c")
ADVICE = "the model file changed or was truncated while mapped; restore it and restart"


@dataclass(frozen=True)
class FileState:
    size: int
    mtime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, path: str) -> FileState | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def describe_change(path: str, before: FileState, after: FileState | None) -> str | None:
    """One line saying how the file `path` (same inode) changed in place since `before`, or None when it did
    not. A file removed or replaced (renamed over) is not a change here: its old inode lives on in the mapping,
    so the weights stay intact."""
    if after is None or (after.inode, after.device) != (before.inode, before.device) or after == before:
        return None
    if after.size != before.size:
        return f"{path}: size {before.size} -> {after.size} bytes"
    return f"{path}: modified in place (mtime changed)"


class ModelFileGuard:
    def __init__(self, paths: list[str]):
        self.states = {p: FileState.of(p) for p in paths}
        self.states = {p: s for p, s in self.states.items() if s is not None}
        self._stop = threading.Event()

    def changed(self) -> str | None:
        """The first in-place change since load, as one line, or None. A file removed or replaced is logged
        once (this process keeps the old one) and no longer watched."""
        for path, state in list(self.states.items()):
            now = FileState.of(path)
            if now is None or (now.inode, now.device) != (state.inode, state.device):
                log.warning("%s was removed or replaced; this process keeps serving the weights it loaded "
                            "(restart to load the new file)", path)
                del self.states[path]
                continue
            change = describe_change(path, state, now)
            if change:
                return change
        return None

    def start(self, interval_s: float) -> None:
        threading.Thread(target=self._watch, args=(interval_s,), name="strata-file-guard", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self, interval_s: float) -> None:
        while self.states and not self._stop.wait(interval_s):
            change = self.changed()
            if change:
                log.critical("strata: %s; %s", change, ADVICE)
                print(f"strata: {change}; {ADVICE}", file=sys.stderr, flush=True)
                os._exit(EXIT_MODEL_FILE_CHANGED)


def mapped_ranges(paths: list[str]) -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's mappings of `paths` (from /proc/self/maps)."""
    wanted = {os.path.realpath(p) for p in paths}
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip() in wanted:
                    lo, hi = parts[0].split("-")
                    out.append((int(lo, 16), int(hi, 16), parts[5].strip()))
    except OSError:
        return []
    return out


@lru_cache(maxsize=1)
def _sigbus_lib() -> ctypes.CDLL | None:
    cc = find_compiler()
    if cc is None:
        log.warning("no C compiler: a model file truncated under this process ends it with a bare SIGBUS")
        return None
    try:
        target = compile_library("sigbus_guard", [SOURCE], cc, ["-O2", "-shared", "-fPIC"])
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("SIGBUS guard not built (%s): a truncated model file ends the process with a bare SIGBUS", e)
        return None
    lib.strata_sigbus_add_range.argtypes = [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_char_p]
    lib.strata_sigbus_install.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return lib


def install_sigbus_handler(paths: list[str]) -> bool:
    """The SIGBUS handler for the mappings of `paths` now in place; False where it cannot be built."""
    lib = _sigbus_lib()
    if lib is None:
        return False
    for lo, hi, path in mapped_ranges(paths):
        lib.strata_sigbus_add_range(lo, hi, f"strata: SIGBUS reading {path}: {ADVICE}\n".encode())
    fallback = f"strata: SIGBUS (bus error) outside the model's mappings; model files: {', '.join(paths)}\n"
    return lib.strata_sigbus_install(fallback.encode(), EXIT_MODEL_FILE_CHANGED) == 0


def guard_model_files(model_path: str, interval_s: float = 5.0) -> ModelFileGuard | None:
    """Watches the safetensors files of the model folder `model_path`: SIGBUS handler and timer (see above).
    None for a model without safetensors files."""
    from strata.errors import WeightsError
    from strata.weights.loader import safetensors_files

    try:
        paths = [os.path.realpath(p) for p in safetensors_files(model_path)]
    except WeightsError:
        return None
    install_sigbus_handler(paths)
    guard = ModelFileGuard(paths)
    guard.start(interval_s)
    return guard
