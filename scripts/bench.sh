#!/usr/bin/env bash
# Benchmarks blkd side by side with its peers in one interleaved run:
#   NBD (fio's nbd engine, unix socket and TCP): blkd, qemu-storage-daemon,
#       qemu-nbd, nbdkit (file plugin), each serving its own copy of one
#       page-cache-warm raw image;
#   vhost-user-blk (the vublk example driver): blkd and qemu-storage-daemon,
#       on null-co and on the raw image.
# Prints a table of medians with ratios to the best peer, and writes
# results.json, results.tsv and table.txt (plus server logs) to the results
# directory. A benchmark, not a test: scripts/test.sh does not run it.
#
# Usage: scripts/bench.sh [--quick] [--nbd-only | --vhost-only]
#            [--servers blkd,qsd,qemu-nbd,nbdkit[,nbdkit-1thread]] [--filter REGEX]
#            [--runtime SECS] [--rounds N] [--image-size BYTES] [--out DIR]
#            [--blkd PATH] [--vublk PATH] [--no-build]
# Builds blkd and the vublk example in release mode first (in
# $CARGO_TARGET_DIR, default ./target) unless --no-build or both paths are
# given.
set -euo pipefail
cd "$(dirname "$0")/.."

target_dir=${CARGO_TARGET_DIR:-$PWD/target}
blkd= vublk= build=1 servers=
pass=()
while [ $# -gt 0 ]; do
    case $1 in
        --blkd) blkd=$2; shift 2 ;;
        --vublk) vublk=$2; shift 2 ;;
        --no-build) build=0; shift ;;
        --servers) servers=$2; pass+=("$1" "$2"); shift 2 ;;
        -h|--help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exec python3 scripts/bench/bench.py --help ;;
        *) pass+=("$1"); shift ;;
    esac
done

uses_blkd=1
if [ -n "$servers" ] && [[ ",$servers," != *,blkd,* ]]; then uses_blkd=0; fi

if [ "$build" = 1 ]; then
    export CARGO_TERM_COLOR=never
    if [ -z "$blkd" ] && [ "$uses_blkd" = 1 ]; then
        cargo build --release -p blkd --bin blkd
    fi
    if [ -z "$vublk" ]; then
        cargo build --release -p vhost_blk --example vublk
    fi
fi
blkd=${blkd:-$target_dir/release/blkd}
vublk=${vublk:-$target_dir/release/examples/vublk}
for bin in "$vublk" $( [ "$uses_blkd" = 1 ] && echo "$blkd" ); do
    [ -x "$bin" ] || { echo "bench.sh: $bin is missing; build it or pass its path" >&2; exit 1; }
done

# Debian's python3 (pyenv's lacks nothing needed here, but be predictable).
py=/usr/bin/python3
[ -x "$py" ] || py=python3
exec "$py" scripts/bench/bench.py --blkd "$blkd" --vublk "$vublk" "${pass[@]}"
