#!/usr/bin/env bash
# Set up everything pyqvm needs on a Debian 12 machine, idempotently:
# system packages, a virtualenv (.venv) with pyqvm and its test tools, and the built-in guest images.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(qemu-system-x86 qemu-utils qemu-guest-agent busybox-static cpio kmod e2fsprogs lz4 zstd xz-utils
          dpkg apt qemu-system-xen iproute2 gdb vde-switch
          openssh-client dropbear-bin gcc libc6-dev
          qemu-system-arm gcc-aarch64-linux-gnu libc6-dev-arm64-cross mmdebstrap
          ovmf qemu-efi-aarch64 dosfstools mtools fdisk)
# qemu-system-xen: the Xen device model whose argv tests check; iproute2: `ip netns`, the
# "hosts" of the TLS migration tests; gdb: `pyqvm gdb` and its e2e test; vde-switch: the
# switch of each private network (pyqvm.privnet); openssh-client: `pyqvm ssh`;
# dropbear-bin (tools only, no service): dropbearkey cross-checks the host keys pyqvm writes;
# gcc, libc6-dev: the image builder compiles the guest's small C helpers (INITRD_PROGRAMS);
# qemu-system-arm and the aarch64 cross compiler: aarch64 guests and their built-in image;
# mmdebstrap: the debian flavour (a systemd guest; `--flavour all` builds it, ~70 s);
# dosfstools, mtools, fdisk: the UEFI boot disk of every built-in image; ovmf and
# qemu-efi-aarch64 (AAVMF): the firmware that boots it on x86_64 and aarch64
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# The image builder downloads kernel packages with apt-get: it needs package lists.
if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -q
fi

if [ ! -x .venv/bin/python ]; then
    if ! python3 -m venv .venv 2>/dev/null; then
        rm -rf .venv
        SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q python3-venv
        python3 -m venv .venv
    fi
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'

.venv/bin/pyqvm image build --flavour all
.venv/bin/pyqvm image build --flavour default --arch aarch64
