#!/usr/bin/env bash
# Boots a real Linux guest (Debian cloud kernel, busybox initramfs) under QEMU
# TCG on a vhost-user-blk export of blkd or qemu-storage-daemon, runs block
# checks inside it (scripts/guest/init), and checks the image on the host.
#
#   scripts/guest-test.sh [--daemon blkd|qsd] [--blkd PATH] [--keep]
#
# One daemon process serves three guest boots: "boot1" runs the checks and
# writes data, then reboots inside the same QEMU (a device reset); "reboot"
# re-reads the data; a second QEMU process, "boot2" (a new front-end
# connection), re-reads it again and writes more. After the daemon exits on
# SIGTERM the image is checked on the host. Exits non-zero on any failure.
#
# --keep keeps the work directory (serial logs, daemon log, image).
# Environment: BLKD_GUEST_CACHE (kernel cache, default
# ${XDG_CACHE_HOME:-$HOME/.cache}/blkd-guest), BLKD_GUEST_TIMEOUT (seconds per
# QEMU process, default 180; a run takes about 5 s, but TCG on a loaded
# 2-core machine, e.g. next to the other guest test, is several times slower).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
daemon=blkd
blkd=""
keep=0
while [ $# -gt 0 ]; do
    case $1 in
    --daemon) daemon=${2:?--daemon needs blkd or qsd}; shift 2 ;;
    --blkd) blkd=${2:?--blkd needs a path}; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "guest-test: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
case $daemon in
blkd)
    blkd=${blkd:-$repo/target/release/blkd}
    [ -x "$blkd" ] || { echo "guest-test: blkd binary '$blkd' not found (build it or pass --blkd)" >&2; exit 2; }
    daemon_cmd=("$blkd") ;;
qsd) daemon_cmd=(qemu-storage-daemon) ;;
*) echo "guest-test: --daemon must be blkd or qsd, not '$daemon'" >&2; exit 2 ;;
esac
for tool in qemu-system-x86_64 busybox fio blkdiscard ldd cmp; do
    command -v "$tool" >/dev/null || { echo "guest-test: $tool is not installed" >&2; exit 2; }
done

cache=${BLKD_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/blkd-guest}
qemu_timeout=${BLKD_GUEST_TIMEOUT:-180}
start=$SECONDS

# Image layout, shared with the guest through /etc/blkdtest.conf.
CHUNK=4096
LOGICAL_BLOCK_SIZE=4096
NUM_QUEUES=2
DISK_SIZE=$((32 << 20))
REGION_SIZE=$((1 << 20))
A_OFFSET=$((1 << 20))        # written by boot1, read by every later boot
ZERO_OFFSET=$((2 << 20))     # written, then zeroed with BLKZEROOUT
DISCARD_OFFSET=$((3 << 20))  # written, then discarded
B_OFFSET=$((4 << 20))        # written by boot2, in the second QEMU process
FIO_OFFSET=$((8 << 20))      # two fio jobs of FIO_JOB_SIZE each
FIO_JOB_SIZE=$((4 << 20))
MARKER=BLKD-GUEST-REBOOT-MARKER  # at offset 0 from boot1 until the reboot

# Checks each boot must report as PASS; anything missing or failed fails.
expected_boot1="modules vda-present logical-block-size queues capacity writable
    discard-advertised write-zeroes-advertised write-back-flush direct-write-read
    last-block beyond-end-read-empty write-zeroes write-zeroes-read discard
    fio-verify all-queues-used marker-write"
expected_reboot="modules vda-present reboot-data marker-clear"
expected_boot2="modules vda-present reconnect-read reconnect-marker-cleared
    reconnect-write-read"

work=$(mktemp -d "${TMPDIR:-/tmp}/blkd-guest.XXXXXX")
daemon_pid=""
qemu_pid=""
cleanup() {
    local status=$?
    if [ -n "$qemu_pid" ]; then kill "$qemu_pid" 2>/dev/null || true; fi
    if [ -n "$daemon_pid" ]; then
        kill "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    if [ $keep = 1 ] || [ $status != 0 ]; then
        echo "guest-test: logs kept in $work" >&2
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
die() { echo "guest-test: FAIL: $*" >&2; exit 1; }

# --- kernel: a Debian cloud kernel and the virtio modules it needs, cached ---

# Prints the modules needed for virtio_blk over PCI, dependencies first.
module_load_order() { # MODULE_DIR MODULE...
    local dir=$1 m ko deps
    shift
    for m in "$@"; do
        ko=$(find "$dir" -name "$m.ko" | head -n1)
        [ -n "$ko" ] || { echo "guest-test: module $m not found in $dir" >&2; return 1; }
        deps=$(tr '\0' '\n' <"$ko" | sed -n 's/^depends=//p' | tr ',' ' ')
        # shellcheck disable=SC2086
        [ -z "$deps" ] || module_load_order "$dir" $deps
        echo "$m"
    done
}

fetch_kernel() {
    local meta pkg tmp moddir kver
    command -v apt-get >/dev/null || die "no kernel in $cache and no apt-get to download one"
    # The cloud flavour's meta-package names the current kernel package.
    meta=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[^ ]*\)$/\1/p' | head -n1)
    if [ -z "$meta" ]; then
        apt-get update -qq >/dev/null 2>&1 || true
        meta=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[^ ]*\)$/\1/p' | head -n1)
    fi
    [ -n "$meta" ] || die "apt-cache knows no linux-image-cloud-amd64"
    pkg=${meta%-unsigned}-unsigned
    apt-cache show "$pkg" >/dev/null 2>&1 || pkg=$meta
    echo "guest-test: downloading $pkg into $cache" >&2
    tmp=$(mktemp -d "$cache/download.XXXXXX")
    (cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1) || die "apt-get download $pkg failed"
    dpkg -x "$tmp"/*.deb "$tmp/x"
    moddir=$(echo "$tmp"/x/lib/modules/*)
    kver=${moddir##*/}
    mkdir -p "$tmp/$kver/modules"
    cp "$tmp/x/boot/vmlinuz-$kver" "$tmp/$kver/vmlinuz"
    module_load_order "$moddir" virtio_pci virtio_blk | awk '!seen[$0]++' >"$tmp/$kver/modules.load"
    while read -r m; do
        cp "$(find "$moddir" -name "$m.ko" | head -n1)" "$tmp/$kver/modules/"
    done <"$tmp/$kver/modules.load"
    rm -rf "$cache/$kver"
    mv "$tmp/$kver" "$cache/$kver"
    ln -sfn "$kver" "$cache/current"
    rm -rf "$tmp"
}

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
[ -f "$cache/current/vmlinuz" ] || fetch_kernel
flock -u 9
kernel_dir=$(cd "$cache/current" && pwd -P)

# --- initramfs: busybox, the init script, test data, modules, fio ---

root=$work/root
mkdir -p "$root"/{bin,etc,data,modules}
cp /bin/busybox "$root/bin/busybox" 2>/dev/null || cp "$(command -v busybox)" "$root/bin/busybox"
install -m 755 "$repo/scripts/guest/init" "$root/init"
cp "$kernel_dir"/modules/*.ko "$root/modules/"
# fio and util-linux blkdiscard (busybox's has no --zeroout) with the shared
# libraries they load, at their host paths.
host_libs=""
for bin in "$(command -v fio)" "$(command -v blkdiscard)"; do
    mkdir -p "$root/usr/local/bin"
    cp -L "$bin" "$root/usr/local/bin/"
    for lib in $(ldd "$bin" | awk '/=> \// {print $3} /^[ \t]*\/[^ ]*ld-linux/ {print $1}'); do
        [ -e "$root$lib" ] || cp -L --parents "$lib" "$root"
        host_libs="$host_libs:$(dirname "$lib")"
    done
done
host_libs=$(echo "${host_libs#:}" | tr ':' '\n' | awk '!seen[$0]++' | paste -sd:)
head -c $REGION_SIZE /dev/urandom >"$root/data/a.bin"
head -c $REGION_SIZE /dev/urandom >"$root/data/b.bin"
head -c $REGION_SIZE /dev/urandom >"$root/data/c.bin"
head -c $CHUNK "$root/data/a.bin" >"$root/data/last.bin"
head -c $CHUNK /dev/zero >"$root/data/zero-chunk.bin"
cat >"$root/etc/blkdtest.conf" <<CONF
CHUNK=$CHUNK
LOGICAL_BLOCK_SIZE=$LOGICAL_BLOCK_SIZE
NUM_QUEUES=$NUM_QUEUES
DISK_SIZE=$DISK_SIZE
REGION_SIZE=$REGION_SIZE
A_OFFSET=$A_OFFSET
ZERO_OFFSET=$ZERO_OFFSET
DISCARD_OFFSET=$DISCARD_OFFSET
B_OFFSET=$B_OFFSET
FIO_OFFSET=$FIO_OFFSET
FIO_JOB_SIZE=$FIO_JOB_SIZE
MARKER=$MARKER
MODULES="$(paste -sd' ' "$kernel_dir/modules.load")"
HOST_LIBS=$host_libs
CONF
# Uncompressed: faster to build and to unpack under TCG than gzip.
(cd "$root" && find . | busybox cpio -o -H newc 2>/dev/null) >"$work/initrd.cpio"

# --- the daemon ---

img=$work/disk.img
sock=$work/vhost.sock
truncate -s $DISK_SIZE "$img"
"${daemon_cmd[@]}" \
    --blockdev "file,node-name=file0,filename=$img" \
    --blockdev raw,node-name=disk0,file=file0 \
    --export "vhost-user-blk,id=vub0,node-name=disk0,addr.type=unix,addr.path=$sock,writable=on,num-queues=$NUM_QUEUES,logical-block-size=$LOGICAL_BLOCK_SIZE" \
    --chardev "socket,id=m,path=$work/qmp.sock,server=on,wait=off" \
    --monitor chardev=m \
    </dev/null >"$work/daemon.log" 2>&1 &
daemon_pid=$!
# Up to 30 s: QSD starts slowly on a loaded machine.
for _ in $(seq 300); do
    [ -S "$sock" ] && break
    kill -0 "$daemon_pid" 2>/dev/null || break
    sleep 0.1
done
[ -S "$sock" ] || { cat "$work/daemon.log" >&2; die "$daemon did not create $sock"; }

# --- the guests ---

# Runs one QEMU process; PHASE goes to the guest on the kernel command line.
run_qemu() { # NAME PHASE EXTRA_QEMU_ARGS...
    local name=$1 phase=$2 rc=0
    shift 2
    local t0=$SECONDS
    timeout -k 5 "$qemu_timeout" qemu-system-x86_64 \
        -accel tcg -machine q35,memory-backend=mem -smp 2 -m 512M \
        -object memory-backend-memfd,id=mem,size=512M,share=on \
        -nodefaults -no-user-config -display none \
        -serial "file:$work/$name.serial" \
        -kernel "$kernel_dir/vmlinuz" -initrd "$work/initrd.cpio" \
        -append "console=ttyS0 quiet loglevel=3 panic=-1 blkdtest.phase=$phase" \
        -chardev "socket,id=vub,path=$sock" \
        -device "vhost-user-blk-pci,chardev=vub,num-queues=$NUM_QUEUES" \
        "$@" </dev/null >"$work/$name.qemu.log" 2>&1 &
    qemu_pid=$!
    wait "$qemu_pid" || rc=$?
    qemu_pid=""
    echo "guest-test: $name: QEMU exited with status $rc after $((SECONDS - t0)) s" >&2
    if [ $rc != 0 ]; then
        sed 's/^/  qemu: /' "$work/$name.qemu.log" >&2
        # A guest that hung on its disk would hang the next run too.
        if [ $rc = 124 ] || [ $rc = 137 ]; then
            tail -n 40 "$work/$name.serial" | tr -d '\r' >&2
            die "$name: QEMU did not finish within $qemu_timeout s; daemon log: $(cat "$work/daemon.log")"
        fi
        return 1
    fi
}

# Checks the report of one boot in a serial log; prints its lines.
check_boot() { # SERIAL BOOT EXPECTED
    local serial=$1 boot=$2 expected=$3 ok=0 c lines
    lines=$(tr -d '\r' <"$serial" | grep -ao "BLKD-TEST $boot .*" | sed "s/^BLKD-TEST $boot //") || true
    sed "s/^/  $boot /" <<<"$lines" >&2
    for c in $expected; do
        grep -Eq "^PASS $c(:|$)" <<<"$lines" || { echo "guest-test: $boot: check '$c' did not pass" >&2; ok=1; }
    done
    if grep -q "^FAIL" <<<"$lines"; then ok=1; fi
    grep -qx "DONE failures=0" <<<"$lines" || { echo "guest-test: $boot: no clean DONE line" >&2; ok=1; }
    return $ok
}

guest_ok=1
# Boot 1 ends with reboot -f, so this QEMU runs two boots: boot1, then
# "reboot", which powers off.
run_qemu run1 1 || guest_ok=0
check_boot "$work/run1.serial" boot1 "$expected_boot1" || guest_ok=0
check_boot "$work/run1.serial" reboot "$expected_reboot" || guest_ok=0
kill -0 "$daemon_pid" 2>/dev/null || die "$daemon exited after the first QEMU: $(cat "$work/daemon.log")"
run_qemu run2 2 -no-reboot || guest_ok=0
check_boot "$work/run2.serial" boot2 "$expected_boot2" || guest_ok=0
kill -0 "$daemon_pid" 2>/dev/null || die "$daemon exited after the second QEMU: $(cat "$work/daemon.log")"

# --- the daemon's exit and the image ---

kill -TERM "$daemon_pid"
for _ in $(seq 300); do
    kill -0 "$daemon_pid" 2>/dev/null || break
    sleep 0.1
done
host_ok=1
if kill -0 "$daemon_pid" 2>/dev/null; then
    kill -KILL "$daemon_pid"
    wait "$daemon_pid" 2>/dev/null || true
    echo "  host FAIL daemon-exit: still running 30 s after SIGTERM" >&2
    host_ok=0
else
    daemon_rc=0
    wait "$daemon_pid" || daemon_rc=$?
    if [ $daemon_rc = 0 ]; then
        echo "  host PASS daemon-exit" >&2
    else
        echo "  host FAIL daemon-exit: status $daemon_rc after SIGTERM" >&2
        host_ok=0
    fi
fi
daemon_pid=""
host_check() { # NAME COMMAND...
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then
        echo "  host PASS $name" >&2
    else
        echo "  host FAIL $name: $(head -n 5 <<<"$out")" >&2
        host_ok=0
    fi
}
region() { # OFFSET LENGTH
    dd if="$img" bs=$CHUNK skip=$(($1 / CHUNK)) count=$(($2 / CHUNK)) status=none
}
host_check image-a cmp <(region $A_OFFSET $REGION_SIZE) "$root/data/a.bin"
host_check image-b cmp <(region $B_OFFSET $REGION_SIZE) "$root/data/b.bin"
host_check image-zeroed cmp <(region $ZERO_OFFSET $REGION_SIZE) <(head -c $REGION_SIZE /dev/zero)
host_check image-last-block cmp <(region $((DISK_SIZE - CHUNK)) $CHUNK) "$root/data/last.bin"
host_check image-marker-cleared cmp <(region 0 $CHUNK) <(head -c $CHUNK /dev/zero)
host_check image-size test "$(stat -c %s "$img")" = $DISK_SIZE
# Any file fio leaves goes to the work directory.
cd "$work"
# fio's default random seed is fixed, so verify_only re-derives the blocks the
# guest wrote and checks their headers and checksums in the image.
host_check image-fio fio --name=verify --filename="$img" --thread --ioengine=psync \
    --rw=randwrite --bs=4k --offset=$FIO_OFFSET --size=$FIO_JOB_SIZE --numjobs=2 \
    --offset_increment=$FIO_JOB_SIZE --verify=crc32c --verify_fatal=1 --verify_only \
    --verify_state_save=0 --group_reporting --minimal

elapsed=$((SECONDS - start))
if [ $guest_ok = 1 ] && [ $host_ok = 1 ]; then
    echo "guest-test: PASS against $daemon in ${elapsed} s"
else
    for f in "$work"/run*.serial; do
        echo "--- $f (last 40 lines)" >&2
        tail -n 40 "$f" | tr -d '\r' >&2
    done
    echo "--- daemon log" >&2
    cat "$work/daemon.log" >&2
    echo "guest-test: FAIL against $daemon in ${elapsed} s" >&2
    exit 1
fi
