"""A model file truncated or changed under a running engine: one line naming the file and exit code 75."""

from __future__ import annotations

import os
import subprocess
import sys

from strata.weights.file_guard import EXIT_MODEL_FILE_CHANGED, FileState, ModelFileGuard, describe_change
from tests.tiers.test_rss import REPO, write_mixtral

CHILD = r"""
import os, sys, time
from strata import LLM
from strata.engine.sampling_params import SamplingParams
from strata.weights.file_guard import guard_model_files
model, how = sys.argv[1], sys.argv[2]
llm = LLM(model, progress=False, dtype="float32", num_threads=1)  # float32: weights stay views of the mapping
params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
llm.generate([[5, 6, 7]], params)
weights = os.path.join(model, "model.safetensors")
if how == "truncate":
    guard_model_files(model, interval_s=3600)  # the timer would not fire: the SIGBUS handler must
    os.truncate(weights, 0)
    llm.generate([[5, 6, 7]], params)
else:
    guard_model_files(model, interval_s=0.1)
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        llm.generate([[5, 6, 7]], params)
print("still running")
"""


def run_child(tmp_path, how: str) -> subprocess.CompletedProcess:
    model = tmp_path / "model"
    write_mixtral(model, layers=2, experts=4, hidden=64, inter=128)
    env = {"STRATA_CACHE_DIR": str(tmp_path / "cache"), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", CHILD, str(model), how], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180, check=False)


def test_truncated_file_gives_one_line_and_exit_code(tmp_path):
    run = run_child(tmp_path, "truncate")
    weights = os.path.realpath(tmp_path / "model" / "model.safetensors")
    assert run.returncode == EXIT_MODEL_FILE_CHANGED, (run.returncode, run.stderr[-2000:])
    assert f"strata: SIGBUS reading {weights}: the model file changed or was truncated" in run.stderr
    assert "still running" not in run.stdout


def test_modified_file_is_seen_by_the_timer(tmp_path):
    run = run_child(tmp_path, "touch")
    weights = os.path.realpath(tmp_path / "model" / "model.safetensors")
    assert run.returncode == EXIT_MODEL_FILE_CHANGED, (run.returncode, run.stderr[-2000:])
    assert f"strata: {weights}: modified in place (mtime changed); the model file changed" in run.stderr


def test_describe_change():
    before = FileState(100, 5, 7, 1)
    assert describe_change("m", before, before) is None
    assert describe_change("m", before, None) is None  # removed: the mapping keeps the old inode
    assert describe_change("m", before, FileState(100, 5, 8, 1)) is None  # renamed over: same
    assert describe_change("m", before, FileState(40, 6, 7, 1)) == "m: size 100 -> 40 bytes"
    assert describe_change("m", before, FileState(100, 6, 7, 1)) == "m: modified in place (mtime changed)"


def test_removed_file_is_left_alone(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x" * 10)
    guard = ModelFileGuard([str(f)])
    f.unlink()
    assert guard.changed() is None and not guard.states
