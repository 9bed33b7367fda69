"""compile_library: one build per source hash in the cache folder; other builds are removed only when stale."""

import os
import time

import pytest

from strata.layers import quant_native


@pytest.mark.skipif(quant_native.find_compiler() is None, reason="no C compiler")
def test_builds_of_other_sources_removed_only_when_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATA_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "a.c"
    cc = quant_native.find_compiler()

    def build(body: str):
        src.write_text(f"int f(void) {{ return {body}; }}\n")
        return quant_native.compile_library("probe", [src], cc, ["-O0", "-shared", "-fPIC"])

    first = build("1")
    assert build("1") == first  # the same sources: the cached build
    second = build("2")
    assert second != first and first.exists()  # young: another checkout may be loading it
    old = time.time() - quant_native.STALE_BUILD_S - 60
    os.utime(first, (old, old))
    third = build("3")
    assert not first.exists() and second.exists() and third.exists()
