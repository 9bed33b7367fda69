"""Which instruction set the kernels build for (quant_native.isa), and the AVX2 build checked on any AVX2 host.

On a host with AVX-512 the suite runs the AVX-512 build; test_avx2_build_kernels_match_torch then runs the layer
tests that compare kernels with torch once more, in a subprocess that builds and loads the AVX2 library
(STRATA_ISA=avx2), so that both builds are checked wherever the suite runs. On an AVX2-only host the whole suite
already runs the AVX2 build.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from strata.layers import quant_native

AVX512 = frozenset(quant_native.CPU_FLAGS)
AVX2 = frozenset(quant_native.AVX2_CPU_FLAGS)


@pytest.mark.parametrize("flags, forced, expected", [
    (AVX512 | AVX2, None, "avx512"),
    (AVX2, None, "avx2"),
    (AVX512 | AVX2, "avx2", "avx2"),
    (frozenset({"avx", "sse4_2"}), None, None),
    (frozenset({"avx", "sse4_2"}), "avx2", None),  # forcing needs the instructions
    (AVX2 - {"f16c"}, None, None),
])
def test_isa_follows_the_cpu_flags(monkeypatch, flags, forced, expected):
    monkeypatch.setattr(quant_native, "cpu_flags", lambda: flags)
    if forced is None:
        monkeypatch.delenv("STRATA_ISA", raising=False)
    else:
        monkeypatch.setenv("STRATA_ISA", forced)
    assert quant_native.isa() == expected
    assert quant_native.cpu_supported() == (expected is not None)


KERNEL_TESTS = ["test_linear.py", "test_quant_linear.py", "test_quant_kquant.py", "test_quant_gemm.py",
                "test_decode_attention.py", "test_norm.py", "test_rotary.py", "test_cpu_sample.py",
                "test_moe_native.py", "test_quant_mxfp4.py"]


@pytest.mark.skipif(quant_native.find_compiler() is None, reason="no C compiler")
@pytest.mark.skipif(not AVX2 <= quant_native.cpu_flags(), reason="the CPU lacks AVX2, FMA or F16C")
@pytest.mark.skipif(quant_native.isa() == "avx2", reason="the whole suite runs the AVX2 build on this CPU")
def test_avx2_build_kernels_match_torch():
    here = Path(__file__).parent
    env = dict(os.environ, STRATA_ISA="avx2")
    code = "from strata.layers import quant_native as q; assert q.isa() == 'avx2' and q.native_lib() is not None"
    probe = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                           check=False)
    assert probe.returncode == 0, probe.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                          *[str(here / t) for t in KERNEL_TESTS]],
                         env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert run.returncode == 0, run.stdout[-3000:]
