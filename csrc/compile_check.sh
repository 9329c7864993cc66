#!/usr/bin/env bash
# Compile every csrc/*.cu for sm_80 and sm_90a with the machine's nvcc: compile only (-c), into a
# temporary directory, warnings as errors. Needs no GPU and no torch headers (the .cu files include only
# the CUDA toolkit and csrc/ headers). Exits non-zero if any file fails.
#
#   csrc/compile_check.sh            # NVCC=/path/to/nvcc to pick another compiler
set -euo pipefail

csrc="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nvcc="${NVCC:-nvcc}"
if ! command -v "$nvcc" >/dev/null 2>&1; then
  echo "compile_check: nvcc not found (put it on PATH or set NVCC=/path/to/nvcc)" >&2
  exit 2
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

status=0
for src in "$csrc"/*.cu; do
  name="$(basename "$src")"
  if "$nvcc" -std=c++17 -O3 -Werror all-warnings -Xcompiler -Wall \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a \
    -I"$csrc" -c "$src" -o "$out/$name.o"; then
    echo "compile_check: ok     $name"
  else
    echo "compile_check: FAILED $name" >&2
    status=1
  fi
done
exit "$status"
