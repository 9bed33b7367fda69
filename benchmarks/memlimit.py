"""A cgroup-v1 memory limit around one benchmark subprocess, so every engine (Strata and its peers) gets the
same memory, page cache included: with the limit below the model's size, an mmap engine must read from disk.

    with MemCgroup("llamacpp", limit_bytes=3 << 30) as cg:
        subprocess.run(cmd, preexec_fn=cg.enter)
        cg.report()      # {"cgroup_limit_bytes", "cgroup_max_usage_bytes", "cgroup_failcnt", "cgroup_oom_kills"}

The group is a child of this process's own memory cgroup (/proc/self/cgroup, line ":memory:"); the limit
applies to everything the child and its descendants charge (anonymous memory and the page cache they fault
in). On exit the group is emptied (memory.force_empty drops its page cache) and removed, also on errors.
`python benchmarks/memlimit.py` checks the mechanism: a child allocating past the limit is killed, one that
reads a file larger than the limit stays under it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

MOUNT = Path("/sys/fs/cgroup/memory")


def own_memory_cgroup() -> Path | None:
    """This process's memory cgroup folder under MOUNT (cgroup v1), or None."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):
            return MOUNT / rel.lstrip("/")
    return None


def unavailable_reason() -> str | None:
    """None when a child memory cgroup can be created here, else one line saying why not."""
    parent = own_memory_cgroup()
    if parent is None:
        return "no cgroup-v1 memory controller in /proc/self/cgroup (cgroup v2 or no cgroups)"
    if not (parent / "memory.limit_in_bytes").exists():
        return f"{parent}/memory.limit_in_bytes not found (memory controller not mounted at {MOUNT})"
    if not os.access(parent, os.W_OK):
        return f"cannot create a child cgroup in {parent} (not writable; run as root)"
    return None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class MemCgroup:
    """Context manager owning one child memory cgroup with `limit_bytes` (memory and, if present, memory+swap)."""

    def __init__(self, name: str, limit_bytes: int):
        parent = own_memory_cgroup()
        if parent is None:
            raise RuntimeError(unavailable_reason())
        safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
        self.path = parent / f"strata-bench-{os.getpid()}-{safe}-{time.monotonic_ns() % 10**9}"
        self.limit_bytes = int(limit_bytes)
        self.memsw = False

    def __enter__(self) -> Self:
        self.path.mkdir()
        try:
            (self.path / "memory.limit_in_bytes").write_text(str(self.limit_bytes))
            sw = self.path / "memory.memsw.limit_in_bytes"
            if sw.exists():  # without it, swap (if the machine has any) would take what the limit pushes out
                try:
                    sw.write_text(str(self.limit_bytes))
                    self.memsw = True
                except OSError:
                    pass
        except BaseException:
            self.path.rmdir()
            raise
        return self

    def enter(self, pid: int | None = None) -> None:
        """Moves `pid` (default: the calling process; use as subprocess preexec_fn) into the group."""
        (self.path / "cgroup.procs").write_text(str(pid or os.getpid()))

    def report(self) -> dict:
        oom = {}
        try:
            for line in (self.path / "memory.oom_control").read_text().splitlines():
                k, v = line.split()
                oom[k] = int(v)
        except (OSError, ValueError):
            pass
        return {"cgroup_limit_bytes": self.limit_bytes, "cgroup_memsw_limited": self.memsw,
                "cgroup_max_usage_bytes": _read_int(self.path / "memory.max_usage_in_bytes"),
                "cgroup_failcnt": _read_int(self.path / "memory.failcnt"), "cgroup_oom_kills": oom.get("oom_kill")}

    def __exit__(self, *exc) -> None:
        for _ in range(50):  # processes left behind (a killed child's grandchildren) are killed, then rmdir
            try:
                pids = [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
            except OSError:
                pids = []
            for p in pids:
                try:
                    os.kill(p, 9)
                except ProcessLookupError:
                    pass
            try:
                if not pids:
                    (self.path / "memory.force_empty").write_text("0")
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        print(f"warning: could not remove {self.path}", file=sys.stderr)


def run_limited(cmd: list[str], name: str, limit_bytes: int, **kw) -> tuple[subprocess.CompletedProcess, dict]:
    """subprocess.run(cmd) inside a fresh MemCgroup; returns (result, report) with a `killed` flag in report."""
    with MemCgroup(name, limit_bytes) as cg:
        r = subprocess.run(cmd, preexec_fn=cg.enter, check=False, **kw)
        rep = cg.report()
    rep["killed"] = r.returncode in (-9, 137)
    return r, rep


def _selftest() -> int:
    """A 1 GiB allocation under 256 MiB is killed; a 512 MiB file mmap-read twice under 128 MiB is read twice."""
    reason = unavailable_reason()
    if reason:
        print("cgroup unavailable:", reason)
        return 1
    mib = 1 << 20
    r, rep = run_limited([sys.executable, "-c", "b = bytearray(1 << 30); b[::4096] = b'x' * (1 << 18)"],
                         "selftest-alloc", 256 * mib, capture_output=True)
    print(f"alloc 1 GiB under 256 MiB: rc {r.returncode}, killed {rep['killed']}, "
          f"max usage {rep['cgroup_max_usage_bytes'] / mib:.0f} MiB, oom kills {rep['cgroup_oom_kills']}")
    ok = rep["killed"] and rep["cgroup_max_usage_bytes"] <= 256 * mib
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"memlimit-selftest-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.writelines(os.urandom(mib) for _ in range(512))
        fd = os.open(tmp, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        code = f"import mmap; f = open({str(tmp)!r}, 'rb'); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ); "
        code += "s = sum(m[i] for i in range(0, len(m), 4096)); s += sum(m[i] for i in range(0, len(m), 4096)); "
        code += "print([ln for ln in open('/proc/self/io') if ln.startswith('read_bytes')][0].split()[1])"
        r, rep = run_limited([sys.executable, "-c", code], "selftest-mmap", 128 * mib, capture_output=True)
        read = int(r.stdout.split()[-1]) if r.returncode == 0 else 0
        print(f"mmap-read a 512 MiB file twice under 128 MiB: rc {r.returncode}, read {read / mib:.0f} MiB from disk, "
              f"max usage {rep['cgroup_max_usage_bytes'] / mib:.0f} MiB, failcnt {rep['cgroup_failcnt']}")
        ok = ok and r.returncode == 0 and rep["cgroup_max_usage_bytes"] <= 128 * mib and read > 768 * mib
    finally:
        tmp.unlink(missing_ok=True)
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(_selftest())
