#!/usr/bin/env bash
# Builds and runs the C++ kernel tests (csrc/tests):
#   1. natively under AddressSanitizer + UndefinedBehaviorSanitizer (every ISA the CPU supports;
#      parallel_run on both of its backends),
#   2. cross-compiled for aarch64 (the NEON path) and run under qemu-user.
# Installs g++-aarch64-linux-gnu and qemu-user with apt-get when they are missing.
# Exits non-zero on any failure. Build trees go to csrc/tests/build/ (git-ignored).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/csrc/tests"
OUT="${LWK_CPP_BUILD_DIR:-$ROOT/csrc/tests/build}"
JOBS="$(nproc 2>/dev/null || echo 2)"
GEN=()
if command -v ninja >/dev/null 2>&1; then GEN=(-G Ninja); fi

step() { printf '\n==> %s\n' "$*"; }

# --- 1. native, sanitized -------------------------------------------------------------------
step "native build with AddressSanitizer + UndefinedBehaviorSanitizer"
cmake -S "$SRC" -B "$OUT/asan" "${GEN[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLWK_SANITIZE=ON
cmake --build "$OUT/asan" --parallel "$JOBS" --target test_joint_block test_parallel test_buffer_pool test_dense_conv \
  test_inverted_residual test_transpose test_recent_results
step "native tests (ASan + UBSan)"
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_string_checks=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
"$OUT/asan/test_joint_block"
# parallel_run on the thread pool alone, then with an OpenMP runtime loaded as PyTorch loads its own.
"$OUT/asan/test_parallel"
"$OUT/asan/test_parallel" --host-openmp
"$OUT/asan/test_buffer_pool"
"$OUT/asan/test_recent_results"
"$OUT/asan/test_dense_conv"
"$OUT/asan/test_inverted_residual"
"$OUT/asan/test_transpose"
unset ASAN_OPTIONS UBSAN_OPTIONS

# --- 2. aarch64 / NEON under qemu-user ------------------------------------------------------
if [ "$(uname -m)" = "aarch64" ]; then
  step "host is aarch64: the native run above already covered NEON"
  exit 0
fi

need=()
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || need+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null 2>&1 || need+=(qemu-user)
if [ "${#need[@]}" -gt 0 ]; then
  step "installing ${need[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${need[@]}"
fi

step "cross build for aarch64 (NEON path)"
cmake -S "$SRC" -B "$OUT/aarch64" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DLWK_UBSAN=ON \
  -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
  -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++
cmake --build "$OUT/aarch64" --parallel "$JOBS" --target test_joint_block test_dense_conv test_inverted_residual \
  test_transpose
step "aarch64 tests under qemu-user (UBSan, quick grid)"
# (Not test_parallel: qemu-user cannot fork a multi-threaded guest; that code is not ISA-specific.)
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  qemu-aarch64 -L /usr/aarch64-linux-gnu "$OUT/aarch64/test_joint_block" --quick
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  qemu-aarch64 -L /usr/aarch64-linux-gnu "$OUT/aarch64/test_dense_conv" --quick
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  qemu-aarch64 -L /usr/aarch64-linux-gnu "$OUT/aarch64/test_inverted_residual" --quick
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  qemu-aarch64 -L /usr/aarch64-linux-gnu "$OUT/aarch64/test_transpose" --quick

step "C++ kernel tests passed"

# --- 3. training kernels (native, ASan + UBSan) ------------------------------------------------
step "training kernels: native build and tests (ASan + UBSan)"
cmake --build "$OUT/asan" --parallel "$JOBS" --target test_train_kernels
ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_string_checks=1" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  "$OUT/asan/test_train_kernels"
