#!/bin/bash
# Benchmark: `qemu-img convert -O raw` against `oxcow convert -O raw`.
#
# Builds a 2 GiB qcow2 image with a mix of content, plus zlib- and zstd-compressed
# copies (made with `qemu-img convert -c`), then times both tools converting each to
# raw (several interleaved runs, median) and prints a table with the wall-clock and
# CPU times and the ratios oxcow/qemu-img (below 1: oxcow is faster).
#
# The mix (built by bench/mixed_image.sh), in 32 regions of 64 MiB: zeros (never
# written, so unallocated in the qcow2 image), random bytes from /dev/urandom, and
# compressible text whose last 128 KiB of every MiB is zeros.
#
# Environment:
#   BENCH_DIR   scratch directory (default: a new directory under /tmp, removed at exit)
#   RUNS        timed runs per tool and image (default 7)
#   OXCOW       oxcow binary (default: target/release/oxcow next to this script)
#   QEMU_IMG    qemu-img binary (default: qemu-img)
#   KEEP=1      keep the scratch directory
#
# Build oxcow first: cargo build --release
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/bench/mixed_image.sh"
OXCOW=${OXCOW:-$here/target/release/oxcow}
QEMU_IMG=${QEMU_IMG:-qemu-img}
RUNS=${RUNS:-7}
if [ -n "${BENCH_DIR:-}" ]; then
    dir=$BENCH_DIR
    mkdir -p "$dir"
    own_dir=0
else
    dir=$(mktemp -d /tmp/oxcow-bench.XXXXXX)
    own_dir=1
fi
cleanup() {
    rm -f "$dir"/out.raw
    if [ "${KEEP:-0}" != 1 ]; then
        rm -f "$dir"/mixed.raw "$dir"/mixed.qcow2 "$dir"/mixed-zlib.qcow2 "$dir"/mixed-zstd.qcow2
        [ "$own_dir" = 1 ] && rmdir "$dir" 2>/dev/null || true
    fi
}
trap cleanup EXIT

[ -x "$OXCOW" ] || { echo "no oxcow binary at $OXCOW (cargo build --release)" >&2; exit 1; }

mib=$((1 << 20))
region=$((64 * mib))
if [ ! -f "$dir/mixed.qcow2" ]; then
    echo "building the 2 GiB mixed image in $dir ..." >&2
    make_mixed_raw "$dir"
    "$QEMU_IMG" convert -f raw -O qcow2 "$dir/mixed.raw" "$dir/mixed.qcow2"
    "$QEMU_IMG" convert -c -f qcow2 -O qcow2 -o compression_type=zlib "$dir/mixed.qcow2" "$dir/mixed-zlib.qcow2"
    "$QEMU_IMG" convert -c -f qcow2 -O qcow2 -o compression_type=zstd "$dir/mixed.qcow2" "$dir/mixed-zstd.qcow2"
    rm -f "$dir/mixed.raw"
fi

# Times one run: prints "wall cpu" (cpu = user + system time of all threads).
time_once() {
    rm -f "$dir/out.raw"
    sync
    local TIMEFORMAT='%R %U %S' t
    t=$( { time "$@" >/dev/null 2>&1; } 2>&1 )
    echo "$t" | awk '{printf "%.3f %.3f\n", $1, $2 + $3}'
}

# The median of the numbers on stdin.
median() {
    sort -n | awk '{a[NR]=$1} END {printf "%.3f", (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'
}

echo "median of $RUNS interleaved runs; wall = elapsed seconds, cpu = user+sys seconds" >&2
printf '%-18s %10s %10s %10s %10s %7s %7s\n' image "qemu wall" "oxcow wall" "qemu cpu" "oxcow cpu" "wall x" "cpu x"
for img in mixed mixed-zlib mixed-zstd; do
    src="$dir/$img.qcow2"
    # Warm the page cache once, and check both tools agree.
    "$QEMU_IMG" convert -O raw "$src" "$dir/ref.raw"
    "$OXCOW" convert -O raw "$src" "$dir/out.raw"
    cmp "$dir/ref.raw" "$dir/out.raw" || { echo "outputs differ for $img" >&2; exit 1; }
    rm -f "$dir/ref.raw"
    qt=(); xt=()
    for r in $(seq "$RUNS"); do
        # Alternate which tool goes first so neither always inherits the other's
        # dirty pages.
        if [ $((r % 2)) = 1 ]; then
            qt+=("$(time_once "$QEMU_IMG" convert -O raw "$src" "$dir/out.raw")")
            xt+=("$(time_once "$OXCOW" convert -O raw "$src" "$dir/out.raw")")
        else
            xt+=("$(time_once "$OXCOW" convert -O raw "$src" "$dir/out.raw")")
            qt+=("$(time_once "$QEMU_IMG" convert -O raw "$src" "$dir/out.raw")")
        fi
    done
    qw=$(printf '%s\n' "${qt[@]}" | cut -d' ' -f1 | median)
    qc=$(printf '%s\n' "${qt[@]}" | cut -d' ' -f2 | median)
    xw=$(printf '%s\n' "${xt[@]}" | cut -d' ' -f1 | median)
    xc=$(printf '%s\n' "${xt[@]}" | cut -d' ' -f2 | median)
    printf '%-18s %10s %10s %10s %10s %7.2f %7.2f\n' "$img.qcow2" "$qw" "$xw" "$qc" "$xc" \
        "$(echo "$xw / $qw" | bc -l)" "$(echo "$xc / $qc" | bc -l)"
done
