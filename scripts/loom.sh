#!/usr/bin/env bash
# Runs the loom models of the allocator's lock-free paths
# (rust/radixseg-core/tests/loom_allocator.rs). `--cfg loom` swaps the crate's
# atomics and locks for loom's (see src/sync.rs); the separate target
# directory keeps that build from invalidating the normal one. Raise
# LOOM_MAX_PREEMPTIONS for a deeper (much slower) search; extra arguments go
# to the test harness, e.g. `scripts/loom.sh alloc_races_retire_segment`.
set -euo pipefail
cd "$(dirname "$0")/.."

export RUSTFLAGS="${RUSTFLAGS:-} --cfg loom"
export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-2}"

start=$(date +%s)
cargo test -p radixseg-core --release --target-dir target/loom \
    --test loom_allocator -- --nocapture "$@"
echo "loom: models passed in $(($(date +%s) - start)) s (LOOM_MAX_PREEMPTIONS=${LOOM_MAX_PREEMPTIONS})"
