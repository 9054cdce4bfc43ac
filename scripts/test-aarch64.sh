#!/usr/bin/env bash
# Cross-checks the Rust crates on AArch64, where the CPU decode kernel
# (radixseg-cpu) runs its NEON path: clippy for the aarch64 target, then the
# unit tests of radixseg-core and radixseg-cpu under qemu-user (the kernel's
# cover every instruction set the target has: NEON and scalar, against the
# f64 reference and every FP8/fp16/bf16 code). Installs what is missing:
# the rustup target, and the cross linker and qemu from Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo=sudo; fi
  pkgs=(qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
  $sudo apt-get install -y -q "${pkgs[@]}" \
    || { $sudo apt-get update -q && $sudo apt-get install -y -q "${pkgs[@]}"; }
fi
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cargo clippy --target "$target" -p radixseg-core -p radixseg-cpu --all-targets -- -D warnings
cargo test --release --target "$target" -p radixseg-core -p radixseg-cpu --lib
