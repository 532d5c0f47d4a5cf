"""`pyqvm doctor`'s checklist as data: what each mode (tcg, kvm, vfio, xen) needs,
whether this host has it, and the exact fix when it does not.

`run_checks` reads the host (under ``root``) and returns a `Report`; it prints
nothing and changes nothing. The CLI formats it (or dumps `Report.to_json`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pyqvm.host.accel import host_tsc_khz, kvm_status
from pyqvm.host.claims import ClaimStore
from pyqvm.host.facts import (
    QEMU_PACKAGES,
    find_qemu_binaries,
    find_xen_device_model,
    qemu_version_line,
    search_path,
)
from pyqvm.host.modes import MODES, Mode
from pyqvm.host.packages import BUILDER_TOOLS, TOOL_PACKAGES, install_hint, read_os_release
from pyqvm.host.pci import list_pci_devices
from pyqvm.host.sriov import list_pfs
from pyqvm.host.vfio import (
    MEMLOCK_MARGIN_MIB,
    VFIO_DRIVER,
    IommuStatus,
    MemlockStatus,
    cpu_vendor,
    iommu_status,
    memlock_status,
    vfio_pci_loaded,
)

__all__ = ["MODES", "Check", "Mode", "Report", "Status", "run_checks"]

_log = logging.getLogger(__name__)

Status = Literal["ok", "warn", "fail", "info"]

_VERSION_RE = re.compile(r"QEMU emulator version (\S+)")


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the checklist. ``fail`` means the mode cannot work until ``fix`` is done."""

    mode: Mode
    name: str
    status: Status
    reason: str
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Report:
    """Every check run, by mode."""

    checks: tuple[Check, ...]

    def for_mode(self, mode: Mode) -> list[Check]:
        return [c for c in self.checks if c.mode == mode]

    def usable(self, mode: Mode) -> bool:
        """A mode works when none of its checks failed (and it was checked at all)."""
        mine = self.for_mode(mode)
        return bool(mine) and all(c.status != "fail" for c in mine)

    @property
    def modes(self) -> list[Mode]:
        return [m for m in MODES if self.for_mode(m)]

    def to_json(self) -> dict[str, Any]:
        return {
            "modes": {
                m: {"usable": self.usable(m), "checks": [c.to_json() for c in self.for_mode(m)]}
                for m in self.modes
            }
        }


# --- QEMU ----------------------------------------------------------------------------------


def _qemu_version(binary: Path) -> str | None:
    m = _VERSION_RE.search(qemu_version_line(binary) or "")
    return m.group(1) if m else None


def _qemu_checks(mode: Mode, root: Path, arch: str) -> list[Check]:
    distro = read_os_release(root)  # the fixes name its package manager and names
    binaries = find_qemu_binaries(root)
    package = QEMU_PACKAGES.get(arch, "qemu-system")
    binary = binaries.get(arch)
    if binary is None:
        return [
            Check(
                mode,
                "qemu",
                "fail",
                f"qemu-system-{arch} is not installed (not on PATH)",
                install_hint(package, distro),
            )
        ]
    version = _qemu_version(binary)
    checks = [
        Check(
            mode,
            "qemu",
            "ok" if version else "warn",
            f"qemu-system-{arch} {version} ({binary})"
            if version
            else f"{binary} did not say its version (`{binary.name} --version` failed)",
            "" if version else f"reinstall it ({install_hint(package, distro)})",
        )
    ]
    if shutil.which("qemu-img", path=f"{binary.parent}{os.pathsep}{search_path(root)}"):
        checks.append(Check(mode, "qemu-img", "ok", "qemu-img found (for disk overlays)"))
    else:
        checks.append(
            Check(
                mode,
                "qemu-img",
                "warn",
                "qemu-img not found: VMs with ephemeral disks cannot start",
                install_hint("qemu-utils", distro),
            )
        )
    return checks


# --- KVM -----------------------------------------------------------------------------------


def _kvm_checks(root: Path) -> list[Check]:
    vendor = cpu_vendor(root)
    module = {"intel": "kvm_intel", "amd": "kvm_amd"}.get(vendor or "", "kvm_intel or kvm_amd")
    checks: list[Check] = []
    mod_dir = root / "sys/module"
    loaded = [m for m in ("kvm", "kvm_intel", "kvm_amd") if (mod_dir / m).is_dir()]
    if "kvm" in loaded and any(m != "kvm" for m in loaded):
        checks.append(Check("kvm", "module", "ok", f"modules loaded: {', '.join(loaded)}"))
    else:
        checks.append(
            Check(
                "kvm",
                "module",
                "fail",
                f"the {module} module is not loaded"
                + (f" (loaded: {', '.join(loaded)})" if loaded else ""),
                f"modprobe {module}; if it fails, enable VT-x/AMD-V in the BIOS/EFI setup "
                "(or nested virtualization on the outer hypervisor)",
            )
        )
    dev = root / "dev/kvm"
    checks.append(
        Check("kvm", "/dev/kvm", "ok", "/dev/kvm exists")
        if dev.exists()
        else Check(
            "kvm",
            "/dev/kvm",
            "fail",
            "/dev/kvm does not exist",
            f"modprobe {module} (it appears when the module loads)",
        )
    )
    try:
        text = (root / "proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        flags = {w for line in text.splitlines() if line.startswith("flags") for w in line.split()}
    except OSError:
        flags = set()
    virt = sorted(flags & {"vmx", "svm"})
    checks.append(
        Check("kvm", "cpu", "ok", f"the CPU advertises {virt[0]}")
        if virt
        else Check(
            "kvm",
            "cpu",
            "fail",
            "the CPU advertises neither vmx (Intel VT-x) nor svm (AMD-V)",
            "enable VT-x/AMD-V in the BIOS/EFI setup; in a VM, turn on nested "
            "virtualization in the outer hypervisor",
        )
    )
    st = kvm_status(root)
    checks.append(
        Check("kvm", "usable", "ok", st.reason)
        if st.usable
        else Check(
            "kvm",
            "usable",
            "fail",
            f"KVM is not usable: {st.reason}",
            'use accelerator = "tcg" (or "auto") meanwhile; fix the lines above for KVM',
        )
    )
    return checks


# --- VFIO ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _VfioHost:
    """What the vfio checks look at, read once."""

    root: Path
    memory_mib: int
    memlock: MemlockStatus
    claims: ClaimStore | None
    iommu: IommuStatus
    vendor: str | None

    @property
    def wanted_param(self) -> str:
        return "amd_iommu=on" if self.vendor == "amd" else "intel_iommu=on"


def _iommu(h: _VfioHost) -> Iterable[Check]:
    st = h.iommu
    yield Check("vfio", "iommu", "ok" if st.enabled else "fail", st.reason,
                "" if st.enabled else st.fix)  # fmt: skip


def _kernel_parameter(h: _VfioHost) -> Iterable[Check]:
    params, amd = h.iommu.cmdline_params, h.vendor == "amd"
    if any(p.endswith("=off") for p in params):
        yield Check(
            "vfio", "kernel-parameter", "fail",
            f"the kernel command line turns the IOMMU off ({' '.join(params)})",
            f"replace it with {h.wanted_param} iommu=pt (GRUB_CMDLINE_LINUX in "
            "/etc/default/grub, update-grub, reboot)",
        )  # fmt: skip
    elif params:
        yield Check("vfio", "kernel-parameter", "ok", " ".join(params))
    else:
        yield Check(
            "vfio", "kernel-parameter", "info" if h.iommu.enabled or amd else "fail",
            "no IOMMU parameter on the kernel command line"
            + (" (AMD enables its IOMMU by default)" if amd else ""),
            "" if h.iommu.enabled else f"add {h.wanted_param} iommu=pt to GRUB_CMDLINE_LINUX "
            "in /etc/default/grub, run update-grub, reboot",
        )  # fmt: skip


def _vfio_pci(h: _VfioHost) -> Iterable[Check]:
    if vfio_pci_loaded(h.root):
        yield Check("vfio", "vfio_pci", "ok", "the vfio-pci driver is loaded")
    else:
        yield Check(
            "vfio", "vfio_pci", "fail", "the vfio_pci module is not loaded",
            "modprobe vfio-pci (and at boot: echo vfio-pci > /etc/modules-load.d/vfio-pci.conf)",
        )  # fmt: skip


def _dev_vfio(h: _VfioHost) -> Iterable[Check]:
    node = h.root / "dev/vfio/vfio"
    if not node.exists():
        yield Check(
            "vfio", "/dev/vfio", "fail", "/dev/vfio/vfio does not exist (no VFIO container device)",
            "modprobe vfio-pci (it loads vfio and vfio_iommu_type1)",
        )  # fmt: skip
        return
    access = os.access(node, os.R_OK | os.W_OK)
    yield Check(
        "vfio", "/dev/vfio", "ok" if access else "fail",
        f"{node} exists" + ("" if access else " but is not read-writable by you"),
        "" if access else "run as root, or give your user access to /dev/vfio/*",
    )  # fmt: skip


def _memlock(h: _VfioHost) -> Iterable[Check]:
    need, memlock = h.memory_mib + MEMLOCK_MARGIN_MIB, h.memlock
    limit = "unlimited" if memlock.limit is None else f"{memlock.limit // (1 << 20)} MiB"
    if memlock.allows_mib(need):
        lifted = memlock.ipc_lock and memlock.limit is not None
        why = "CAP_IPC_LOCK lifts it" if lifted else "enough"
        yield Check(
            "vfio", "memlock", "ok",
            f"locked-memory limit {limit}: {why} for a {h.memory_mib} MiB guest",
        )  # fmt: skip
    else:
        yield Check(
            "vfio", "memlock", "fail",
            f"locked-memory limit {limit}: VFIO pins all guest RAM, a {h.memory_mib} MiB guest "
            f"needs {need} MiB",
            "run pyqvm as root, or `ulimit -l unlimited` (a memlock line in "
            "/etc/security/limits.conf makes it permanent)",
        )  # fmt: skip


def _bound_devices(h: _VfioHost) -> Iterable[Check]:
    if on_vfio := [d.address for d in list_pci_devices(h.root) if d.driver == VFIO_DRIVER]:
        yield Check("vfio", "devices", "info", f"bound to vfio-pci now: {', '.join(on_vfio)}")


def _sriov(h: _VfioHost) -> Iterable[Check]:
    if pfs := list_pfs(h.root):
        yield Check(
            "vfio", "sr-iov", "info",
            "SR-IOV PFs: " + ", ".join(f"{p.address} ({p.num_vfs}/{p.total_vfs} VFs)" for p in pfs),
        )  # fmt: skip


def _claims(h: _VfioHost) -> Iterable[Check]:
    if h.claims is None:
        return
    if stale := h.claims.stale():
        yield Check(
            "vfio", "claims", "warn",
            "devices left claimed by dead pyqvm processes: "
            + ", ".join(f"{r.address} (VM {r.vm!r}, pid {r.pid})" for r in stale),
            "pyqvm doctor --fix (gives them back to their drivers)",
        )  # fmt: skip
    if live := [r for r in h.claims.records() if r.alive]:
        yield Check(
            "vfio", "claims", "info",
            "in use: " + ", ".join(f"{r.address} by VM {r.vm!r}" for r in live),
        )  # fmt: skip


#: The vfio checks, in the order doctor prints them; each is independent of the others.
VFIO_CHECKS: tuple[Callable[[_VfioHost], Iterable[Check]], ...] = (
    _iommu, _kernel_parameter, _vfio_pci, _dev_vfio, _memlock, _bound_devices, _sriov, _claims,
)  # fmt: skip


def _vfio_checks(
    root: Path, memory_mib: int, memlock: MemlockStatus, claims: ClaimStore | None
) -> list[Check]:
    host = _VfioHost(root, memory_mib, memlock, claims, iommu_status(root), cpu_vendor(root))
    return [check for step in VFIO_CHECKS for check in step(host)]


# --- Xen -----------------------------------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def _xen_checks(root: Path) -> list[Check]:
    checks: list[Check] = []
    hv = _read(root / "sys/hypervisor/type")
    caps = _read(root / "proc/xen/capabilities")
    install = (
        "boot this machine into Xen with it as dom0: apt-get install -y xen-system-amd64, "
        "reboot and pick the Xen entry in GRUB"
    )
    if hv == "xen" and caps is not None and "control_d" in caps:
        checks.append(Check("xen", "dom0", "ok", "running as the Xen control domain (dom0)"))
    elif hv == "xen":
        checks.append(
            Check(
                "xen",
                "dom0",
                "fail",
                "running under Xen, but as a guest (domU), not dom0: a device model needs dom0",
                "run pyqvm in dom0",
            )
        )
    else:
        what = (
            f"/sys/hypervisor/type says {hv!r}" if hv else "no /sys/hypervisor/type, no /proc/xen"
        )
        checks.append(
            Check(
                "xen",
                "dom0",
                "fail",
                f"this host is not a Xen dom0 ({what}); a Xen HVM guest's QEMU device model "
                "runs only in dom0, next to the Xen hypervisor",
                install,
            )
        )
    model = find_xen_device_model(root)
    checks.append(
        Check("xen", "device-model", "ok", f"Xen device model: {model}")
        if model is not None
        else Check(
            "xen",
            "device-model",
            "fail",
            "no QEMU built for Xen (qemu-system-x86_64 has no xen accelerator on Debian)",
            install_hint("qemu-system-xen", read_os_release(root)),
        )
    )
    return checks


def _tsc_check(root: Path) -> Check:
    """Whether ``machine = "auto"`` can use microvm under TCG here (see resolve.pick_machine)."""
    khz = host_tsc_khz(root)
    if khz is not None:
        return Check(
            "tcg",
            "microvm",
            "ok",
            f"host TSC {khz} kHz known: direct-boot virtio guests get the fast microvm "
            f"machine (with tsc_early_khz={khz})",
        )
    return Check(
        "tcg",
        "microvm",
        "warn",
        'host TSC rate unknown: machine "auto" uses q35 (a microvm guest can hang '
        "calibrating its TSC under TCG); boots are ~0.2 s slower",
        "put tsc_early_khz=<host TSC kHz> on the guest kernel command line",
    )


# --- the image builder -----------------------------------------------------------------------

#: Where a static libc (for the guest's static helper) lives: Debian and Ubuntu, Fedora and
#: openSUSE, Arch.
_STATIC_LIBC = ("usr/lib/x86_64-linux-gnu/libc.a", "usr/lib/aarch64-linux-gnu/libc.a",
                "usr/lib64/libc.a", "usr/lib/libc.a")  # fmt: skip


def _builder_check(root: Path) -> Check:
    """The host tools the built-in images are built with (a warning: an exported image can
    be imported instead); the fix names every missing package in one command."""
    path = search_path(root)
    missing = [t for t in BUILDER_TOOLS if not shutil.which(t, path=path)]
    packages = list(dict.fromkeys(TOOL_PACKAGES[t] for t in missing))
    if not any((root / p).is_file() for p in _STATIC_LIBC):
        missing.append("a static libc")
        packages.append("libc6-dev")
    if not missing:
        return Check("tcg", "image-builder", "ok", "the image builder's host tools are there")
    return Check(
        "tcg",
        "image-builder",
        "warn",
        f"building the built-in images needs {', '.join(missing)} (or import an exported "
        "image: pyqvm image import)",
        install_hint(packages, read_os_release(root)),
    )


# --- all -----------------------------------------------------------------------------------


def run_checks(
    modes: Iterable[Mode] = MODES,
    root: Path = Path("/"),
    *,
    arch: str = "x86_64",
    memory_mib: int = 1024,
    memlock: MemlockStatus | None = None,
    claims: ClaimStore | None = None,
) -> Report:
    """Check what each of ``modes`` needs on the host under ``root``.

    ``memory_mib`` is the guest size the memlock check assumes; ``claims`` the
    store whose stale entries are reported (None: skip that check).
    """
    wanted: Sequence[Mode] = [m for m in MODES if m in set(modes)]
    checks: list[Check] = []
    by_mode: Mapping[Mode, Any] = {
        "tcg": lambda: [
            *_qemu_checks("tcg", root, arch),
            Check("tcg", "accelerator", "ok", "TCG (software emulation) needs nothing more"),
            _tsc_check(root),
            _builder_check(root),
        ],
        "kvm": lambda: [*_qemu_checks("kvm", root, arch), *_kvm_checks(root)],
        "vfio": lambda: _vfio_checks(root, memory_mib, memlock or memlock_status(), claims),
        "xen": lambda: _xen_checks(root),
    }
    for mode in wanted:
        checks.extend(by_mode[mode]())
    return Report(tuple(checks))
