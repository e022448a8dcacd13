#!/usr/bin/env bash
# Installs what the tests need: NBD clients, fio, nbdkit, certtool, busybox and
# QEMU (system emulator) from bookworm-backports so that qemu-utils 10.0.2 stays.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
export DEBIAN_FRONTEND=noninteractive

BACKPORTS=/etc/apt/sources.list.d/bookworm-backports.sources
if [ ! -f "$BACKPORTS" ]; then
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    $SUDO tee "$BACKPORTS" >/dev/null <<SRC
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

need=()
for pair in nbdinfo:libnbd-bin nbdsh:libnbd-bin nbdkit:nbdkit fio:fio certtool:gnutls-bin \
            busybox:busybox-static qemu-system-x86_64:qemu-system-x86; do
    cmd=${pair%%:*}; pkg=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
# From / so that the workspace's own nbd/ directory is not taken for the module.
(cd / && /usr/bin/python3 -c 'import nbd; nbd.NBD') 2>/dev/null || need+=(python3-libnbd)
[ -e /usr/bin/busybox ] || need+=(busybox-static)

if [ ${#need[@]} -gt 0 ]; then
    $SUDO apt-get update -qq
    # qemu-system-x86 must come from backports: the default suite's 7.2 would
    # replace the preinstalled qemu-utils 10.0.2.
    $SUDO apt-get install -y -qq -t bookworm-backports --no-install-recommends \
        $(printf '%s\n' "${need[@]}" | sort -u) qemu-utils qemu-block-extra >/dev/null
fi

# The PyPI QMP client (qemu.qmp) used by the QMP client tests and qmp-shell.
if ! (cd / && python3 -c 'import qemu.qmp') 2>/dev/null; then
    python3 -m pip install -q --disable-pip-version-check qemu.qmp 2>/dev/null \
        || python3 -m pip install -q --user --disable-pip-version-check qemu.qmp
fi
