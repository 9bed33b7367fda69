#!/usr/bin/env bash
# Prints the ggml cmake flags for this CPU's instruction sets, read from /proc/cpuinfo: AVX2/FMA/F16C, and the
# AVX-512 family only where the CPU has it; AMX always off (-march=native would pick AMX, whose repacked buffers
# segfault on quantized GGUFs). Sourced by install_llamacpp.sh and install_llama_server.sh.
ggml_isa_flags() {
  local flags
  flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
  has() { [[ "$flags" == *" $1 "* ]] && echo ON || echo OFF; }
  echo "-DGGML_NATIVE=OFF -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma)" \
    "-DGGML_F16C=$(has f16c) -DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VBMI=$(has avx512vbmi)" \
    "-DGGML_AVX512_VNNI=$(has avx512_vnni) -DGGML_AVX512_BF16=$(has avx512_bf16)" \
    "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
}
