#!/usr/bin/env bash
# Builds llama.cpp's own `llama-server` (parallel slots, continuous batching) from the llama.cpp sources that
# the llama-cpp-python 0.3.36 sdist carries (unpacked by install_llamacpp.sh), with the same ISA flags (this
# CPU's, AMX off) as the llama-cpp-python peer, into .cache/peers/llama-server-build/bin/llama-server.
# Idempotent: does nothing when that binary is there. Benchmarks only; not a strata dependency.
# CMAKE_BUILD_PARALLEL_LEVEL (default 2) bounds the compile jobs.
set -euo pipefail
cd "$(dirname "$0")/../.."
VERSION=0.3.36
PEERS=${PEERS_DIR:-.cache/peers}  # PEERS_DIR: another checkout's .cache/peers, to share one build
SRC=$PEERS/llama_cpp_python-$VERSION/vendor/llama.cpp
BUILD=$PEERS/llama-server-build
BIN=$BUILD/bin/llama-server

if [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; then
  echo "llama-server already built: $BIN"
  exit 0
fi
if [ ! -f "$SRC/tools/server/CMakeLists.txt" ]; then
  mkdir -p "$PEERS"
  SDIST=$PEERS/llama_cpp_python-$VERSION.tar.gz
  if [ ! -f "$SDIST" ]; then
    .venv/bin/pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$PEERS"
  fi
  tar -xzf "$SDIST" -C "$PEERS"
fi

# No web UI download, no HTTPS (the benchmark talks plain HTTP on localhost); the ISA flags of this CPU with AMX
# off, as install_llamacpp.sh (ggml_isa_flags.sh).
source benchmarks/peers/ggml_isa_flags.sh
# shellcheck disable=SC2046
cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF $(ggml_isa_flags)
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} cmake --build "$BUILD" --config Release \
  --target llama-server
"$BIN" --version
