"""Accelerator facts: is KVM usable here, which accelerator to use, the host TSC rate.

Every reader takes a ``root`` so unit tests can point it at a fake tree; the
real device probes (opening ``/dev/kvm``, ioctls) run only when ``root`` is ``/``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pyqvm.errors import HostError

__all__ = ["KvmStatus", "choose_accelerator", "host_tsc_khz", "kvm_status"]

_log = logging.getLogger(__name__)

# <linux/kvm.h>: KVMIO = 0xAE; both are _IO(KVMIO, nr), i.e. no argument struct.
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_API_VERSION = 12

Accelerator = Literal["kvm", "tcg"]

_KVM_FIX = (
    'use accelerator = "tcg" (or "auto"), or make KVM usable: enable VT-x/AMD-V '
    "in the firmware (or nested virtualization on the outer hypervisor), load "
    "kvm_intel or kvm_amd, and add yourself to the kvm group"
)


@dataclass(frozen=True, slots=True)
class KvmStatus:
    """Whether KVM can run guests here; ``reason`` says why (or why not) in words."""

    usable: bool
    reason: str


def _is_real_root(root: Path) -> bool:
    return root.resolve() == Path("/")


def _cpu_flags(root: Path) -> set[str] | None:
    """The x86 CPU flags from /proc/cpuinfo; None if there is no "flags" line (not x86).

    Raises:
        OSError: /proc/cpuinfo is unreadable.
    """
    text = (root / "proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return set(value.split())
    return None


def _open_failure(dev: Path) -> str | None:
    """Why /dev/kvm cannot be opened read-write, or None if it can."""
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        hint = "; add yourself to the kvm group" if exc.errno in (errno.EACCES, errno.EPERM) else ""
        return f"{dev} exists but cannot be opened read-write: {exc.strerror}{hint}"
    os.close(fd)
    return None


def _probe_failure(dev: Path) -> str | None:
    """Ask KVM for its API version and create (then drop) a VM; say what failed, or None."""
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"{dev} cannot be opened read-write: {exc.strerror}"
    try:
        try:
            api = fcntl.ioctl(fd, KVM_GET_API_VERSION)
        except OSError as exc:
            return f"KVM_GET_API_VERSION on {dev} failed: {exc.strerror}"
        if api != KVM_API_VERSION:
            return f"{dev} reports KVM API version {api}, expected {KVM_API_VERSION}"
        try:
            vm_fd = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        except OSError as exc:
            return f"KVM_CREATE_VM on {dev} failed: {exc.strerror}"
        os.close(vm_fd)
        return None
    finally:
        os.close(fd)


def kvm_status(root: Path = Path("/")) -> KvmStatus:
    """Tell whether KVM can run guests on this host.

    Checks, in order: ``/dev/kvm`` exists (and, on the real root, opens
    read-write), the CPU advertises ``vmx`` or ``svm``, and (real root only)
    ``KVM_GET_API_VERSION`` is 12 and ``KVM_CREATE_VM`` succeeds.
    """
    dev = root / "dev/kvm"
    real = _is_real_root(root)
    if not dev.exists():
        return KvmStatus(False, "/dev/kvm does not exist (kvm_intel/kvm_amd not loaded?)")
    if real:
        failure = _open_failure(dev)
        if failure is not None:
            return KvmStatus(False, failure)

    try:
        flags = _cpu_flags(root)
    except OSError as exc:
        return KvmStatus(
            False,
            f"/proc/cpuinfo is unreadable ({exc.strerror}); cannot tell if the CPU has VT-x/AMD-V",
        )
    if flags is None:
        # Not x86 (e.g. arm64 has no such flag): only the KVM probe can tell.
        virt = "no x86 flags"
    else:
        # A nested host can expose a working /dev/kvm without vmx/svm; guests then hang.
        found = sorted(flags & {"vmx", "svm"})
        if not found:
            return KvmStatus(
                False,
                "/dev/kvm exists but the CPU advertises neither vmx nor svm "
                "(no hardware virtualization; nested virtualization off?)",
            )
        virt = f"CPU flag {found[0]}"

    if real:
        failure = _probe_failure(dev)
        if failure is not None:
            return KvmStatus(False, failure)
        return KvmStatus(True, f"/dev/kvm works ({virt}, KVM API {KVM_API_VERSION})")
    return KvmStatus(True, f"/dev/kvm present, {virt} (not probed: fake root)")


def choose_accelerator(requested: Literal["auto", "kvm", "tcg"], status: KvmStatus) -> Accelerator:
    """Resolve the requested accelerator against the host's KVM status.

    Raises:
        HostError: ``requested`` is ``"kvm"`` and KVM is not usable.
    """
    if requested == "tcg":
        return "tcg"
    if requested == "kvm":
        if not status.usable:
            raise HostError(
                f"accelerator kvm requested but KVM is not usable: {status.reason}; {_KVM_FIX}"
            )
        return "kvm"
    if status.usable:
        _log.info("accelerator auto: using kvm (%s)", status.reason)
        return "kvm"
    _log.info("accelerator auto: using tcg, KVM not usable (%s)", status.reason)
    return "tcg"


_KMSG_REFINED = re.compile(r"tsc: Refined TSC clocksource calibration: (\d+)\.(\d+) MHz")
_KMSG_DETECTED = re.compile(r"tsc: Detected (\d+)\.(\d+) MHz processor")
_CPUINFO_MHZ = re.compile(r"^cpu MHz\s*:\s*(\d+)(?:\.(\d+))?", re.MULTILINE)


def _mhz_to_khz(whole: str, frac: str | None) -> int:
    # Kernel prints MHz with exactly three decimals, i.e. kHz resolution; avoid float rounding.
    return int(whole) * 1000 + int(((frac or "") + "000")[:3])


def _read_kmsg(path: Path) -> str | None:
    """The kernel log as text, or None if it cannot be read (dmesg_restrict, no /dev/kmsg)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    chunks: list[bytes] = []
    try:
        # /dev/kmsg hands out one record per read and EAGAIN at the end; a plain file gives EOF.
        for _ in range(1 << 16):
            try:
                chunk = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # record overwritten while reading; skip it
                    continue
                return None
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", errors="replace")


def host_tsc_khz(root: Path = Path("/")) -> int | None:
    """The host TSC frequency in kHz, or None if no source tells it.

    Under TCG (without ``-icount``) QEMU feeds the guest's RDTSC from the host's
    own cycle counter (``cpu_get_ticks`` → ``cpu_get_host_ticks``), so the guest
    TSC ticks at the host TSC rate; this is the value for ``tsc_early_khz=``.

    Sources, best first: ``/sys/devices/system/cpu/cpu0/tsc_freq_khz`` (some
    kernels only); the kernel log via ``/dev/kmsg`` ("Refined TSC clocksource
    calibration", else "Detected ... MHz processor"); ``cpu MHz`` in
    ``/proc/cpuinfo`` (may be the current, scaled frequency on bare metal).
    """
    sysfs = root / "sys/devices/system/cpu/cpu0/tsc_freq_khz"
    try:
        khz = int(sysfs.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        pass
    else:
        if khz > 0:
            _log.debug("host TSC %d kHz from %s", khz, sysfs)
            return khz

    kmsg = _read_kmsg(root / "dev/kmsg")
    if kmsg is not None:
        for pattern in (_KMSG_REFINED, _KMSG_DETECTED):
            matches = pattern.findall(kmsg)
            if matches:
                khz = _mhz_to_khz(*matches[-1])
                _log.debug("host TSC %d kHz from kernel log (%s)", khz, pattern.pattern)
                return khz

    try:
        cpuinfo = (root / "proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    found = _CPUINFO_MHZ.search(cpuinfo)
    if found is None:
        return None
    khz = _mhz_to_khz(found.group(1), found.group(2))
    _log.debug("host TSC %d kHz from /proc/cpuinfo cpu MHz (last resort)", khz)
    return khz if khz > 0 else None
