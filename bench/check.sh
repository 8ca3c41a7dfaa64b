#!/bin/bash
# Benchmark: `qemu-img check` against `oxcow check` (the reference count of every
# host cluster, compared with the refcounts, and the COPIED flags) on:
#
#   prealloc256g   a 256 GiB image with preallocation=metadata (64 KiB clusters:
#                  4 Mi clusters, 128 MiB of L2 tables)
#   prealloc8g4k   an 8 GiB image with 4 KiB clusters and preallocation=metadata
#                  (2 Mi clusters, 4096 L2 tables)
#   mixed          the 2 GiB mixed image of bench/mixed_image.sh converted to qcow2
#                  by qemu-img (data, holes, compressible text)
#
# Both tools check the same file, interleaved (which tool goes first alternates),
# with a warm page cache; the table gives the median wall and CPU (user + system)
# seconds and the ratios oxcow/qemu-img (below 1: oxcow is faster). Both outputs
# must be equal (JSON) before anything is timed.
#
# Environment:
#   BENCH_DIR   scratch directory (default: a new directory under /tmp, removed at exit)
#   RUNS        timed runs per tool and image (default 5)
#   CASES       rows to run (default "prealloc256g prealloc8g4k mixed")
#   OXCOW       oxcow binary (default: target/release/oxcow next to this script)
#   QEMU_IMG    qemu-img binary (default: qemu-img)
#   KEEP=1      keep the scratch directory (and its images, reused by later runs)
#
# Build oxcow first: cargo build --release
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/bench/mixed_image.sh"
OXCOW=${OXCOW:-$here/target/release/oxcow}
QEMU_IMG=${QEMU_IMG:-qemu-img}
RUNS=${RUNS:-5}
CASES=${CASES:-prealloc256g prealloc8g4k mixed}
if [ -n "${BENCH_DIR:-}" ]; then
    dir=$BENCH_DIR
    mkdir -p "$dir"
    own_dir=0
else
    dir=$(mktemp -d /tmp/oxcow-bench.XXXXXX)
    own_dir=1
fi
cleanup() {
    if [ "${KEEP:-0}" != 1 ]; then
        rm -f "$dir"/mixed.raw "$dir"/mixed.qcow2 "$dir"/p256g.qcow2 "$dir"/p8g4k.qcow2
        [ "$own_dir" = 1 ] && rmdir "$dir" 2>/dev/null || true
    fi
}
trap cleanup EXIT

[ -x "$OXCOW" ] || { echo "no oxcow binary at $OXCOW (cargo build --release)" >&2; exit 1; }

# Times one run: prints "wall cpu" (cpu = user + system time of all threads).
time_once() {
    local TIMEFORMAT='%R %U %S' t
    t=$( { time "$@" >/dev/null 2>&1; } 2>&1 )
    echo "$t" | awk '{printf "%.3f %.3f\n", $1, $2 + $3}'
}

# The median of the numbers on stdin.
median() {
    sort -n | awk '{a[NR]=$1} END {printf "%.3f", (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'
}

ratio() {
    echo "$1 / $2" | bc -l | awk '{printf "%.2f", $1}'
}

image_for() {
    case $1 in
        prealloc256g)
            f=$dir/p256g.qcow2
            [ -f "$f" ] || "$QEMU_IMG" create -q -f qcow2 -o preallocation=metadata "$f" 256G
            ;;
        prealloc8g4k)
            f=$dir/p8g4k.qcow2
            [ -f "$f" ] || "$QEMU_IMG" create -q -f qcow2 -o preallocation=metadata,cluster_size=4k "$f" 8G
            ;;
        mixed)
            f=$dir/mixed.qcow2
            if [ ! -f "$f" ]; then
                echo "building the 2 GiB mixed image in $dir ..." >&2
                make_mixed_raw "$dir"
                "$QEMU_IMG" convert -f raw -O qcow2 "$dir/mixed.raw" "$f"
                rm -f "$dir/mixed.raw"
            fi
            ;;
        *) echo "unknown case $1" >&2; exit 1 ;;
    esac
    echo "$f"
}

echo "median of $RUNS interleaved runs; wall = elapsed seconds, cpu = user+sys seconds;" \
    "$(nproc) CPUs" >&2
fmt='%-14s %9s %10s %9s %10s %7s %7s\n'
printf "$fmt" case "qemu wall" "oxcow wall" "qemu cpu" "oxcow cpu" "wall x" "cpu x"
for c in $CASES; do
    img=$(image_for "$c")
    # Warm the page cache; both tools must report the same.
    q=$("$QEMU_IMG" check --output=json "$img" 2>&1 || true)
    x=$("$OXCOW" check --output=json "$img" 2>&1 || true)
    [ "$q" = "$x" ] || { echo "$c: outputs differ:"; diff <(echo "$q") <(echo "$x"); exit 1; } >&2
    qt=() xt=()
    for r in $(seq "$RUNS"); do
        if [ $((r % 2)) = 1 ]; then
            qt+=("$(time_once "$QEMU_IMG" check "$img")")
            xt+=("$(time_once "$OXCOW" check "$img")")
        else
            xt+=("$(time_once "$OXCOW" check "$img")")
            qt+=("$(time_once "$QEMU_IMG" check "$img")")
        fi
    done
    qw=$(printf '%s\n' "${qt[@]}" | cut -d' ' -f1 | median)
    qc=$(printf '%s\n' "${qt[@]}" | cut -d' ' -f2 | median)
    xw=$(printf '%s\n' "${xt[@]}" | cut -d' ' -f1 | median)
    xc=$(printf '%s\n' "${xt[@]}" | cut -d' ' -f2 | median)
    printf "$fmt" "$c" "$qw" "$xw" "$qc" "$xc" "$(ratio "$xw" "$qw")" "$(ratio "$xc" "$qc")"
done
