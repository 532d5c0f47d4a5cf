#!/usr/bin/env bash
# Set up pyqvm on a Debian 12 machine, idempotently.
#
#   scripts/setup.sh          what the first command needs: QEMU for x86_64 guests, the few
#                             host tools the image builder runs, a virtualenv (.venv) with
#                             pyqvm. The guest image itself is built by its first use
#                             (`pyqvm run` fetches its Debian packages with pyqvm's own,
#                             verified archive client: no apt involved).
#   scripts/setup.sh --test   everything the test suite needs besides: the aarch64 and
#                             firmware packages, the tools the tests drive, the test
#                             dependencies, and every built-in image built up front.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-first}
case "$mode" in
    first|--test) ;;
    *) echo "usage: scripts/setup.sh [--test]" >&2; exit 2 ;;
esac

# qemu-system-x86, qemu-utils: the VM and its disks; kmod (depmod), e2fsprogs (mkfs.ext4),
# lz4, dosfstools, mtools, fdisk: the image builder's file systems and initramfs; gcc and
# libc6-dev: it compiles the guest's small C helper (pyqvm-wake) statically.
PACKAGES=(qemu-system-x86 qemu-utils kmod e2fsprogs lz4 dosfstools mtools fdisk gcc libc6-dev)
if [ "$mode" = --test ]; then
    # qemu-system-xen: the Xen device model whose argv tests check; iproute2: `ip netns`,
    # the "hosts" of the TLS migration tests; gdb: `pyqvm gdb` and its e2e test;
    # vde-switch: the switch of each private network (pyqvm.launch.privnet); openssh-client:
    # `pyqvm ssh`; dropbear-bin (tools only, no service): dropbearkey cross-checks the host
    # keys pyqvm writes; qemu-system-arm and the aarch64 cross compiler: aarch64 guests and
    # their built-in images; ovmf and qemu-efi-aarch64 (AAVMF): the firmware that boots the
    # images' UEFI disks;
    # qemu-guest-agent: the agent protocol tests talk to a real qemu-ga on the host;
    # cpio, zstd, xz-utils: tests read pyqvm's archives and kernels with the reference tools;
    # openssh-server: its sshd, which the `--host ssh://` tests run in a network namespace of
    # their own (the package's service is not used); debian-installer-12-netboot-amd64: the
    # guest none of us wrote that the unmodified-guest tests drive (its kernel, initrd and
    # PXE tree); tesseract-ocr: reading its screen; swtpm: the virtual TPM of `tpm = true`.
    PACKAGES+=(qemu-system-xen iproute2 gdb vde-switch openssh-client openssh-server dropbear-bin
               qemu-system-arm gcc-aarch64-linux-gnu libc6-dev-arm64-cross
               ovmf qemu-efi-aarch64 qemu-guest-agent cpio zstd xz-utils
               debian-installer-12-netboot-amd64 tesseract-ocr swtpm)
fi

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' 2>/dev/null \
    || missing+=(python3-venv)
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if [ "$mode" = --test ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[dev]'
    # The images the tests boot. Not debian for x86_64: the suite bootstraps that one itself,
    # as a non-root user without Debian's tools (tests/fixtures/nonroot.py), and boots the
    # result. debian for aarch64 finishes in an aarch64 guest: ~10 min under TCG.
    .venv/bin/pyqvm image build --flavour default
    .venv/bin/pyqvm image build --flavour full
    .venv/bin/pyqvm image build --flavour default --arch aarch64
    .venv/bin/pyqvm image build --flavour debian --arch aarch64
else
    .venv/bin/python -m pip install -q -e .
fi
