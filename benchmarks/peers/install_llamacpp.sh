#!/usr/bin/env bash
# Installs the llama.cpp peer (llama-cpp-python 0.3.36 built from source, AMX off) into the repo's .venv,
# and unpacks the sdist under .cache/peers/ for vendor/llama.cpp/convert_hf_to_gguf.py and its gguf-py.
# Idempotent: does nothing when the right build is already there. Benchmarks only; not a strata dependency.
set -euo pipefail
cd "$(dirname "$0")/../.."
VERSION=0.3.36
PY=.venv/bin/python
PEERS=.cache/peers
SDIST=$PEERS/llama_cpp_python-$VERSION.tar.gz
mkdir -p "$PEERS"

if [ ! -f "$SDIST" ]; then
  .venv/bin/pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$PEERS"
fi
if [ ! -f "$PEERS/llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
  tar -xzf "$SDIST" -C "$PEERS"
fi

# The ISA flags of this CPU, AMX off (ggml_isa_flags.sh).
source benchmarks/peers/ggml_isa_flags.sh
NO_AMX="$(ggml_isa_flags)"

have_build() {
  "$PY" - "$VERSION" <<'PY'
import sys
import llama_cpp
info = llama_cpp.llama_print_system_info().decode()
ok = llama_cpp.__version__ == sys.argv[1] and "AMX_INT8 = 1" not in info
import llama_cpp.server.app  # noqa: F401  (server extras present)
sys.exit(0 if ok else 1)
PY
}

if have_build 2>/dev/null; then
  echo "llama-cpp-python $VERSION (no AMX, server extras) already installed"
  exit 0
fi
# Uninstall first (not --force-reinstall, which would reinstall torch too); --no-cache-dir so pip cannot reuse
# a wheel cached from a build with other CMAKE_ARGS.
.venv/bin/pip uninstall -y llama-cpp-python >/dev/null 2>&1 || true
CMAKE_ARGS="$NO_AMX" CMAKE_BUILD_PARALLEL_LEVEL=2 .venv/bin/pip install --no-cache-dir \
  --no-binary llama-cpp-python --find-links "$PEERS" torch==2.13.0 "llama-cpp-python[server]==$VERSION"
have_build
"$PY" -c "import llama_cpp; print(llama_cpp.__version__, llama_cpp.llama_print_system_info().decode())"
