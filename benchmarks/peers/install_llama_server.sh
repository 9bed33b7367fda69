#!/usr/bin/env bash
# Builds llama.cpp's own `llama-server` (parallel slots, continuous batching) from the llama.cpp sources that
# the llama-cpp-python 0.3.36 sdist carries (unpacked by install_llamacpp.sh), with the same AVX-512-on,
# AMX-off flags as the llama-cpp-python peer, into .cache/peers/llama-server-build/bin/llama-server.
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

# -march=native would pick AMX, whose repacked buffers segfault on quantized GGUFs: the same explicit ISA
# list as install_llamacpp.sh. No web UI download, no HTTPS (the benchmark talks plain HTTP on localhost).
cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF \
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
  -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
  -DGGML_AMX_BF16=OFF
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} cmake --build "$BUILD" --config Release \
  --target llama-server
"$BIN" --version
