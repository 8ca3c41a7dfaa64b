# Shared by the convert benchmarks (source it): builds the 2 GiB mixed raw image.
#
# make_mixed_raw DIR writes DIR/mixed.raw, in 32 regions of 64 MiB (region i):
#   i % 3 == 0  zeros: never written, a hole in the raw file                 (11 regions, 704 MiB)
#   i % 3 == 1  random bytes from /dev/urandom: incompressible data        (11 regions, 704 MiB)
#   i % 3 == 2  compressible text (numbered lines, ~5:1 with zlib); the last
#               128 KiB of every MiB is zeros, which qemu-img leaves
#               unallocated when it converts the raw file to qcow2           (10 regions, 640 MiB)
make_mixed_raw() {
    local dir=$1 text i
    truncate -s 0 "$dir/mixed.raw"
    truncate -s 2G "$dir/mixed.raw"
    text=$(mktemp "$dir/text.XXXXXX")
    # One MiB of compressible text then 128 KiB of zeros, repeated for a region.
    python3 - "$text" <<'PY'
import sys
mib = 1 << 20
n = 0
out = bytearray()
while len(out) < mib - 128 * 1024:
    out += b"%08d the quick brown fox jumps over the lazy dog %d\n" % (n, n * 7919 % 1000)
    n += 1
block = bytes(out[: mib - 128 * 1024]) + bytes(128 * 1024)
with open(sys.argv[1], "wb") as f:
    f.write(block * 64)
PY
    for i in $(seq 0 31); do
        case $((i % 3)) in
            0) ;;
            1) dd if=/dev/urandom of="$dir/mixed.raw" bs=1M count=64 seek=$((i * 64)) conv=notrunc status=none ;;
            2) dd if="$text" of="$dir/mixed.raw" bs=1M count=64 seek=$((i * 64)) conv=notrunc status=none ;;
        esac
    done
    rm -f "$text"
}
