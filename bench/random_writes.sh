#!/bin/bash
# Benchmark: random 4 KiB allocating writes, `qemu-img bench -w` against `oxcow bench -w`.
#
# On a fresh qcow2 image (qemu-img create defaults; cluster sizes 64 KiB and 4 KiB),
# both tools send COUNT write requests of 4 KiB, DEPTH in parallel, with qemu-img
# bench's own request pattern: request k goes to (k * STEP) % SIZE. The image has
# N = 2^ceil(log2(COUNT)) clusters and STEP = M clusters with M odd, so M and N are
# coprime and the COUNT offsets fall at the start of COUNT different clusters,
# scattered over the disk: every write allocates a new cluster (and on the way the
# L2 tables and refcount blocks that cover it). A sanity check after the runs asks
# `qemu-img check` for a clean image with exactly COUNT allocated clusters.
#
# Each configuration runs RUNS times per tool, interleaved, each on a new image
# after a `sync`; the table shows the medians of
#   run    the time the tool reports ("Run completed in X seconds": the requests
#          only, without opening and closing the image)
#   total  the wall time of the whole command, which includes the final flush
#          (writing the metadata and, with the page cache, syncing the data)
# and the ratios oxcow/qemu-img (below 1: oxcow is faster).
# Cache modes: writeback (qemu-img bench's default) and, when the file system
# accepts O_DIRECT, none.
#
# Environment:
#   BENCH_DIR   scratch directory (default: a new directory under /var/tmp, removed
#               at exit); it must be on the file system to measure
#   COUNT       requests per run (default 100000; a 64 KiB-cluster image grows to
#               COUNT * 64 KiB, 6.4 GB by default)
#   DEPTH       requests in parallel (default 64, qemu-img bench's default)
#   RUNS        runs per tool and configuration (default 5)
#   CACHES      cache modes to try (default "writeback none")
#   CLUSTERS    cluster sizes (default "65536 4096")
#   OXCOW       oxcow binary (default: target/release/oxcow next to this script)
#   QEMU_IMG    qemu-img binary (default: qemu-img)
#
# Build oxcow first: cargo build --release
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
OXCOW=${OXCOW:-$here/target/release/oxcow}
QEMU_IMG=${QEMU_IMG:-qemu-img}
COUNT=${COUNT:-100000}
DEPTH=${DEPTH:-64}
RUNS=${RUNS:-5}
CACHES=${CACHES:-writeback none}
CLUSTERS=${CLUSTERS:-65536 4096}
if [ -n "${BENCH_DIR:-}" ]; then
    dir=$BENCH_DIR
    mkdir -p "$dir"
    own_dir=0
else
    dir=$(mktemp -d /var/tmp/oxcow-bench.XXXXXX)
    own_dir=1
fi
cleanup() {
    rm -f "$dir"/t.qcow2 "$dir"/direct.probe
    if [ "$own_dir" = 1 ]; then rmdir "$dir" 2>/dev/null || true; fi
}
trap cleanup EXIT

[ -x "$OXCOW" ] || { echo "no oxcow binary at $OXCOW (cargo build --release)" >&2; exit 1; }

# Whether the file system under $dir opens files with O_DIRECT.
direct_ok() {
    dd if=/dev/zero of="$dir/direct.probe" bs=4096 count=1 oflag=direct status=none 2>/dev/null
    local ok=$?
    rm -f "$dir/direct.probe"
    return $ok
}

# The median of the numbers on stdin.
median() {
    sort -n | awk '{a[NR]=$1} END {printf "%.3f", (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'
}

# Clusters in the image: the smallest power of two holding COUNT clusters.
n=1
while [ "$n" -lt "$COUNT" ]; do n=$((n * 2)); done

# The step for cluster size $1: M clusters, M odd and M * cluster size <= INT_MAX
# (qemu-img's limit for -S).
step_for() {
    local cs=$1 m=12345
    while [ $((m * cs)) -gt 2147483647 ]; do m=$((m / 2)); done
    [ $((m % 2)) = 1 ] || m=$((m - 1))
    [ "$m" -ge 1 ] || m=1
    echo $((m * cs))
}

# One run: a fresh image, then the tool; prints "run total" in seconds.
run_once() {
    local tool=$1 cs=$2 cache=$3 out start end
    rm -f "$dir/t.qcow2"
    "$QEMU_IMG" create -q -f qcow2 -o cluster_size="$cs" "$dir/t.qcow2" $((n * cs))
    sync
    start=$(date +%s.%N)
    out=$("$tool" bench -w -t "$cache" -c "$COUNT" -d "$DEPTH" -s 4096 -S "$(step_for "$cs")" \
        "$dir/t.qcow2")
    end=$(date +%s.%N)
    echo "$out" | awk -v t="$(echo "$end - $start" | bc -l)" \
        '/^Run completed in/ {printf "%s %.3f\n", $4, t}'
}

# Checks the image the last run left: clean, and COUNT allocated clusters.
sanity() {
    local name=$1 report
    report=$("$QEMU_IMG" check "$dir/t.qcow2" 2>&1) || {
        echo "$name: qemu-img check failed:" >&2
        echo "$report" >&2
        exit 1
    }
    echo "$report" | grep -q "^No errors were found on the image." || {
        echo "$name: $report" >&2
        exit 1
    }
    local alloc
    alloc=$(echo "$report" | sed -n 's,^\([0-9]*\)/[0-9]* = .*allocated.*,\1,p')
    [ "$alloc" = "$COUNT" ] || {
        echo "$name: $alloc clusters allocated, expected $COUNT" >&2
        exit 1
    }
}

echo "qemu-img: $("$QEMU_IMG" --version | head -1)"
echo "$COUNT random 4 KiB allocating writes, $DEPTH in parallel; median of $RUNS runs;" \
    "seconds (run: as reported by bench; total: whole command, with the final flush)"
printf '%-8s %-10s %9s %9s %7s %9s %9s %7s\n' cluster cache "qemu run" "oxcow run" "run x" \
    "qemu tot" "oxcow tot" "tot x"
for cache in $CACHES; do
    if [ "$cache" = none ] || [ "$cache" = directsync ]; then
        if ! direct_ok; then
            echo "cache=$cache skipped: the file system under $dir refuses O_DIRECT" >&2
            continue
        fi
    fi
    for cs in $CLUSTERS; do
        qt=(); xt=()
        for r in $(seq "$RUNS"); do
            # Alternate which tool goes first.
            if [ $((r % 2)) = 1 ]; then
                qt+=("$(run_once "$QEMU_IMG" "$cs" "$cache")")
                [ "$r" = 1 ] && sanity "qemu-img cluster=$cs cache=$cache"
                xt+=("$(run_once "$OXCOW" "$cs" "$cache")")
                [ "$r" = 1 ] && sanity "oxcow cluster=$cs cache=$cache"
            else
                xt+=("$(run_once "$OXCOW" "$cs" "$cache")")
                qt+=("$(run_once "$QEMU_IMG" "$cs" "$cache")")
            fi
        done
        rm -f "$dir/t.qcow2"
        qr=$(printf '%s\n' "${qt[@]}" | cut -d' ' -f1 | median)
        qa=$(printf '%s\n' "${qt[@]}" | cut -d' ' -f2 | median)
        xr=$(printf '%s\n' "${xt[@]}" | cut -d' ' -f1 | median)
        xa=$(printf '%s\n' "${xt[@]}" | cut -d' ' -f2 | median)
        printf '%-8s %-10s %9s %9s %7.2f %9s %9s %7.2f\n' "$((cs / 1024))k" "$cache" \
            "$qr" "$xr" "$(echo "$xr / $qr" | bc -l)" "$qa" "$xa" "$(echo "$xa / $qa" | bc -l)"
    done
done
