#!/usr/bin/env bash
# Run one fuzz target of fuzz/ for a given number of minutes.
#
#   scripts/fuzz.sh TARGET MINUTES      TARGET: allocator | tree; MINUTES may
#                                       be fractional (0.5 = 30 s)
#   scripts/fuzz.sh replay TARGET FILE  decode FILE (a crash artifact, say),
#                                       print its actions and run it without
#                                       instrumentation
#   scripts/fuzz.sh seeds TARGET        refresh the committed seeds: a set
#                                       cover of the edges of seeds + corpus
#
# Engine: libFuzzer (libfuzzer-sys 0.4) on the stable toolchain, without a
# sanitizer. With cargo-fuzz installed (`cargo install cargo-fuzz --locked`)
# it runs `cargo fuzz run -s none TARGET`: `-s none` drops ASan's
# `-Zsanitizer=address`, the only nightly-only flag cargo-fuzz passes, and
# keeps the stable coverage instrumentation
#   -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4
#   -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
#   -Cllvm-args=-sanitizer-coverage-pc-table
#   -Cllvm-args=-sanitizer-coverage-trace-compares
#   -Cllvm-args=-sanitizer-coverage-stack-depth
#   -Cllvm-args=-simplifycfg-branch-fold-threshold=0
#   -Cdebug-assertions (which also turns on overflow checks) --cfg fuzzing
# in a release build. Without cargo-fuzz (a fresh CI machine) the script
# passes exactly those flags through RUSTFLAGS to a plain `cargo build
# --target <host>` (the `--target` keeps build scripts and the `arbitrary`
# derive macro uninstrumented) and runs the same binary. Both write to
# fuzz/target only; the main workspace's target/ is never touched.
#
# The corpus grows in fuzz/corpus/TARGET (gitignored); the small committed
# seeds in fuzz/seeds/TARGET are read as a second corpus directory and also
# replayed by `cargo test --manifest-path fuzz/Cargo.toml`. Crashes land in
# fuzz/artifacts/TARGET (gitignored); the script exits non-zero and prints
# how to replay them. The fuzzer runs under `nice -n 19` (FUZZ_NICE
# overrides); extra libFuzzer flags can be given in FUZZ_ARGS, and
# FUZZ_ENGINE=cargo-fuzz|rustflags picks the build path.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

usage() {
    sed -n '2,11p' "$0" >&2
    exit 2
}

if [ "${1:-}" = replay ]; then
    [ $# -eq 3 ] || usage
    file=$(realpath "$3")
    RADIXSEG_FUZZ_REPLAY="$2:$file" exec cargo test --release --quiet \
        --manifest-path fuzz/Cargo.toml --test replay replay_file -- --nocapture
fi

mode=run
if [ "${1:-}" = seeds ]; then
    [ $# -eq 2 ] || usage
    mode=seeds
    shift
    set -- "$1" 0
fi
[ $# -eq 2 ] || usage
target=$1
minutes=$2
case $target in allocator | tree) ;; *) echo "unknown target: $target" >&2; usage ;; esac
seconds=$(awk -v m="$minutes" 'BEGIN { s = int(m * 60 + 0.5); if (s < 1) s = 1; print s }')

corpus=fuzz/corpus/$target
seeds=fuzz/seeds/$target
artifacts=fuzz/artifacts/$target
mkdir -p "$corpus" "$seeds" "$artifacts"
log=$(mktemp "${TMPDIR:-/tmp}/radixseg-fuzz-$target.XXXXXX")
trap 'rm -f "$log"' EXIT

host=$(rustc -vV | sed -n 's/^host: //p')
libfuzzer_args=(
    -max_total_time="$seconds"
    -max_len=8192
    -timeout=20
    -rss_limit_mb=2048
    -print_final_stats=1
    -artifact_prefix="$root/$artifacts/"
)
# shellcheck disable=SC2206
extra=(${FUZZ_ARGS:-})
crashes_before=$(find "$artifacts" -type f | wc -l)

engine=${FUZZ_ENGINE:-}
if [ -z "$engine" ]; then
    if cargo fuzz --version >/dev/null 2>&1; then engine=cargo-fuzz; else engine=rustflags; fi
fi
if [ "$engine" = cargo-fuzz ]; then
    engine="cargo-fuzz $(cargo fuzz --version | awk '{print $2}') (libFuzzer, -s none)"
    nice -n "${FUZZ_NICE:-19}" cargo fuzz build -s none "$target"
    run=(cargo fuzz run -s none "$target" "$corpus" "$seeds" --)
else
    engine="libFuzzer via libfuzzer-sys, cargo-fuzz's flags set by hand in RUSTFLAGS"
    RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-sanitizer-coverage-stack-depth \
-Cllvm-args=-simplifycfg-branch-fold-threshold=0 -Cdebug-assertions -Ccodegen-units=1 \
--cfg fuzzing" \
        nice -n "${FUZZ_NICE:-19}" cargo build --release --manifest-path fuzz/Cargo.toml --target "$host" --bin "$target"
    run=("fuzz/target/$host/release/$target" "$corpus" "$seeds")
fi

if [ "$mode" = seeds ]; then
    # Edges only (no counters, no value profile), so the set stays small.
    fresh=$(mktemp -d "${TMPDIR:-/tmp}/radixseg-seeds-$target.XXXXXX")
    "fuzz/target/$host/release/$target" -set_cover_merge=1 -use_counters=0 \
        -use_value_profile=0 -max_len=8192 "$fresh" "$seeds" "$corpus" 2>&1 | tail -2
    rm -f "$seeds"/*
    cp "$fresh"/* "$seeds"/
    rm -rf "$fresh"
    echo "fuzz: $target: $(find "$seeds" -type f | wc -l) seeds," \
        "$(cat "$seeds"/* | wc -c) bytes in $seeds"
    exit 0
fi

echo "fuzz: $target for ${seconds}s with $engine"
start=$(date +%s)
set +e
nice -n "${FUZZ_NICE:-19}" "${run[@]}" "${libfuzzer_args[@]}" "${extra[@]}" 2>&1 | tee "$log" \
    | grep --line-buffered -v -E '^#[0-9]+\s+(NEW|REDUCE)|NEW_FUNC'
status=${PIPESTATUS[0]}
set -e
elapsed=$(( $(date +%s) - start ))

stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
execs=$(stat number_of_executed_units)
rate=$(stat average_exec_per_sec)
crashes=$(( $(find "$artifacts" -type f | wc -l) - crashes_before ))
echo "fuzz: $target: ${elapsed}s, ${execs:-?} executions, ${rate:-?} exec/s," \
    "corpus $(find "$corpus" -type f | wc -l) files" \
    "($(du -sk "$corpus" | cut -f1) KiB) + $(find "$seeds" -type f | wc -l) seeds," \
    "new crashes: $crashes, date $(date -u +%Y-%m-%d)"
if [ "$status" -ne 0 ] || [ "$crashes" -ne 0 ]; then
    echo "fuzz: $target FAILED (exit $status); artifacts in $artifacts:" >&2
    ls -t "$artifacts" | head -5 >&2
    echo "replay one with: scripts/fuzz.sh replay $target $artifacts/<file>" >&2
    exit 1
fi
