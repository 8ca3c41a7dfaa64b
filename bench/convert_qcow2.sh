#!/bin/bash
# Benchmark: `qemu-img convert -O qcow2` against `oxcow convert -O qcow2`.
#
# Uses the 2 GiB mixed image of bench/convert_raw.sh (bench/mixed_image.sh: zeros,
# random bytes and compressible text in 64 MiB regions), as a raw file and as a qcow2
# image made by qemu-img, and times both tools (several interleaved runs, median of
# the wall-clock and CPU times):
#
#   raw->qcow2       convert -f raw -O qcow2 mixed.raw              (default -m 8)
#   qcow2->qcow2     convert -O qcow2 mixed.qcow2                    (default -m 8)
#   zlib, zstd       convert -c -O qcow2 -o compression_type=T mixed.qcow2, with
#                    qemu-img at -m 1 and at -W -m 2 (its fastest: compression
#                    in parallel, writes out of order) and oxcow at -m 1 and -m 2
#                    (oxcow compresses in parallel without -W; its output is the
#                    same file for any -m)
#
# The table gives, per row, the median wall and CPU (user + system) seconds, the
# ratios oxcow/qemu-img (below 1: oxcow is faster) and, for compressed output, the
# file sizes. For compressed rows the qemu-img time is its -m 1 time on the -m 1 row
# and its -W -m 2 time on the -m 2 row; "best x" compares oxcow with the fastest
# qemu-img setting.
#
# Environment:
#   BENCH_DIR   scratch directory (default: a new directory under /tmp, removed at exit)
#   RUNS        timed runs per tool and setting (default 5)
#   CASES       rows to run (default "raw qcow2 zlib zstd")
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
CASES=${CASES:-raw qcow2 zlib zstd}
if [ -n "${BENCH_DIR:-}" ]; then
    dir=$BENCH_DIR
    mkdir -p "$dir"
    own_dir=0
else
    dir=$(mktemp -d /tmp/oxcow-bench.XXXXXX)
    own_dir=1
fi
cleanup() {
    rm -f "$dir"/out.qcow2 "$dir"/ref.qcow2
    if [ "${KEEP:-0}" != 1 ]; then
        rm -f "$dir"/mixed.raw "$dir"/mixed.qcow2
        [ "$own_dir" = 1 ] && rmdir "$dir" 2>/dev/null || true
    fi
}
trap cleanup EXIT

[ -x "$OXCOW" ] || { echo "no oxcow binary at $OXCOW (cargo build --release)" >&2; exit 1; }

if [ ! -f "$dir/mixed.raw" ] || [ ! -f "$dir/mixed.qcow2" ]; then
    echo "building the 2 GiB mixed image in $dir ..." >&2
    make_mixed_raw "$dir"
    "$QEMU_IMG" convert -f raw -O qcow2 "$dir/mixed.raw" "$dir/mixed.qcow2"
fi

# Times one run: prints "wall cpu" (cpu = user + system time of all threads).
time_once() {
    rm -f "$dir/out.qcow2"
    sync
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

# Times the command lines "qemu-img ARGS1" and "oxcow ARGS2" (arguments before the
# output file, given as one string each), interleaved; sets qw qc xw xc (medians)
# and qsize xsize (output sizes, from the last runs).
bench_pair() {
    local qargs=$1 xargs=$2 r qt=() xt=()
    # Warm the page cache once, and check oxcow's output.
    # shellcheck disable=SC2086
    "$QEMU_IMG" convert $qargs "$dir/ref.qcow2"
    # shellcheck disable=SC2086
    "$OXCOW" convert $xargs "$dir/out.qcow2"
    "$QEMU_IMG" check -q "$dir/out.qcow2" || { echo "oxcow $xargs: check failed" >&2; exit 1; }
    "$QEMU_IMG" compare -q "$dir/ref.qcow2" "$dir/out.qcow2" ||
        { echo "oxcow $xargs: output differs from qemu-img's" >&2; exit 1; }
    rm -f "$dir/ref.qcow2"
    for r in $(seq "$RUNS"); do
        # Alternate which tool goes first.
        if [ $((r % 2)) = 1 ]; then
            # shellcheck disable=SC2086
            qt+=("$(time_once "$QEMU_IMG" convert $qargs "$dir/out.qcow2")")
            qsize=$(stat -c %s "$dir/out.qcow2")
            # shellcheck disable=SC2086
            xt+=("$(time_once "$OXCOW" convert $xargs "$dir/out.qcow2")")
            xsize=$(stat -c %s "$dir/out.qcow2")
        else
            # shellcheck disable=SC2086
            xt+=("$(time_once "$OXCOW" convert $xargs "$dir/out.qcow2")")
            xsize=$(stat -c %s "$dir/out.qcow2")
            # shellcheck disable=SC2086
            qt+=("$(time_once "$QEMU_IMG" convert $qargs "$dir/out.qcow2")")
            qsize=$(stat -c %s "$dir/out.qcow2")
        fi
    done
    qw=$(printf '%s\n' "${qt[@]}" | cut -d' ' -f1 | median)
    qc=$(printf '%s\n' "${qt[@]}" | cut -d' ' -f2 | median)
    xw=$(printf '%s\n' "${xt[@]}" | cut -d' ' -f1 | median)
    xc=$(printf '%s\n' "${xt[@]}" | cut -d' ' -f2 | median)
}

echo "median of $RUNS interleaved runs; wall = elapsed seconds, cpu = user+sys seconds;" \
    "$(nproc) CPUs" >&2
fmt='%-24s %9s %10s %9s %10s %7s %7s %11s %11s %7s %7s\n'
printf "$fmt" case "qemu wall" "oxcow wall" "qemu cpu" "oxcow cpu" "wall x" "cpu x" \
    "qemu size" "oxcow size" "size x" "best x"
row() { # name qemu-args oxcow-args [best-qemu-wall]
    bench_pair "$2" "$3"
    local best="-"
    [ -n "${4:-}" ] && best=$(ratio "$xw" "$(printf '%s\n%s\n' "$qw" "$4" | sort -n | head -1)")
    printf "$fmt" "$1" "$qw" "$xw" "$qc" "$xc" "$(ratio "$xw" "$qw")" "$(ratio "$xc" "$qc")" \
        "$qsize" "$xsize" "$(ratio "$xsize" "$qsize")" "$best"
}
for c in $CASES; do
    case $c in
        raw) row "raw->qcow2" "-f raw -O qcow2 $dir/mixed.raw" "-f raw -O qcow2 $dir/mixed.raw" ;;
        qcow2) row "qcow2->qcow2" "-O qcow2 $dir/mixed.qcow2" "-O qcow2 $dir/mixed.qcow2" ;;
        zlib | zstd)
            a="-c -O qcow2 -o compression_type=$c $dir/mixed.qcow2"
            row "$c -m 1 (q -m 1)" "-m 1 $a" "-m 1 $a"
            q1=$qw
            row "$c -m 2 (q -W -m 2)" "-W -m 2 $a" "-m 2 $a" "$q1"
            ;;
        *) echo "unknown case $c" >&2; exit 1 ;;
    esac
done
