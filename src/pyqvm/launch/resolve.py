"""Turn a spec into what one launch on this host needs: the built-in image
filled in, the accelerator chosen, the QEMU binary and UEFI firmware found, host
devices checked.

Everything here can fail, and does so before QEMU starts.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pyqvm.errors import HostError, SpecError
from pyqvm.host.accel import choose_accelerator
from pyqvm.host.facts import HostFacts, qemu_binary, read_host_facts
from pyqvm.host.firmware import choose_firmware
from pyqvm.host.kernel import KernelInfo, inspect_kernel
from pyqvm.host.packages import install_hint
from pyqvm.host.pci import pci_device_dir
from pyqvm.launch.virtiofs import choose_transports
from pyqvm.spec import IMAGE_DISK_ID, Disk, KernelBoot, VMSpec
from pyqvm.spec.arches import arch_info
from pyqvm.spec.shares import cmdline_entries

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Resolved:
    """A spec made concrete for this host."""

    spec: VMSpec
    accel: Literal["kvm", "tcg"]
    qemu: Path
    facts: HostFacts
    # The built-in guest: its init reads pyqvm.* entries on the kernel command line.
    builtin_guest: bool = False
    # The image runs pyqvm-wake (its manifest says so) and the spec has the agent's bus:
    # the launch gets the wake port (pyqvm.ops.wake).
    wake_port: bool = False


def with_image(spec: VMSpec, cache: Path | None = None) -> VMSpec:
    """Replace ``spec.image`` by the built image's kernel, initrd and base disk."""
    if spec.image is None:
        return spec
    from pyqvm import image  # the launcher touches image/ only to find a built image

    img = image.find(spec.image, cache=cache, arch=spec.arch)
    kernel = KernelBoot(kernel=img.kernel, initrd=img.initrd, append=img.cmdline)
    disk = Disk(path=img.disk, format="qcow2", ephemeral=True, id=IMAGE_DISK_ID)
    pattern = spec.ready_pattern
    if spec.effective_ready == "none" and spec.ready == "auto" and img.ready_marker:
        # No agent to wait for: the console line the image's init prints once it is set up
        # (its console shell starts right after it).
        pattern = img.ready_marker
    return dataclasses.replace(
        spec, image=None, kernel=kernel, disks=(disk, *spec.disks), ready_pattern=pattern
    )


def _mount_at_boot(spec: VMSpec) -> VMSpec:
    """The built-in guest's init mounts the shares it finds on its kernel command line."""
    assert spec.kernel is not None
    append = " ".join([spec.kernel.append, *cmdline_entries(spec.shares)]).strip()
    kernel = dataclasses.replace(spec.kernel, append=append)
    return dataclasses.replace(spec, kernel=kernel)


def pick_machine(spec: VMSpec, accel: str, facts: HostFacts) -> VMSpec:
    """Log what ``machine = "auto"`` picks, and keep microvm off a TCG host whose TSC rate
    is unknown (the guest's TSC calibration can hang there without ``tsc_early_khz``)."""
    machine = spec.effective_machine
    append = spec.kernel.append if spec.kernel else ""
    tsc_risk = (
        machine == "microvm"
        and accel == "tcg"
        and facts.tsc_khz is None
        and "tsc_early_khz=" not in append
    )
    if spec.machine != "auto":
        if tsc_risk:
            log.warning(
                "microvm under TCG without a known host TSC rate: the guest may hang "
                "calibrating its TSC; put tsc_early_khz=<kHz> on the kernel command line"
            )
        return spec
    if tsc_risk:
        log.warning(
            "machine auto: q35, not microvm: the host TSC rate is unknown, and a microvm "
            "guest under TCG can hang calibrating its TSC without tsc_early_khz"
        )
        return dataclasses.replace(spec, machine="q35")
    why = (
        "a directly booted virtio guest with no hotplug room, cdrom or PCI device"
        if machine == "microvm"
        else "the spec needs PCI, IDE or firmware boot"
    )
    log.info("machine auto: %s (%s)", machine, why)
    return spec


def check_kernel(spec: VMSpec) -> KernelInfo:
    """The kernel must be one QEMU can boot directly on this arch: an ELF vmlinux with a
    PVH entry, or a bzImage."""
    assert spec.kernel is not None
    info = inspect_kernel(spec.kernel.kernel, "kernel.kernel")
    if info.arch != spec.arch:
        raise SpecError(
            "kernel.kernel", f"'{info.path}' is an {info.arch} kernel; arch is {spec.arch}"
        )
    if info.format == "elf" and info.pvh_entry is None and spec.arch == "x86_64":
        raise SpecError(
            "kernel.kernel",
            f"'{info.path}' is an ELF vmlinux without a PVH entry note (CONFIG_PVH); "
            "QEMU cannot boot it directly: give the bzImage (/boot/vmlinuz-*) instead",
        )
    return info


def resolve(
    spec: VMSpec,
    *,
    facts: HostFacts | None = None,
    image_cache: Path | None = None,
    host_root: Path = Path("/"),
) -> Resolved:
    """Check ``spec`` against this host and fill in what the host decides.

    ``host_root`` is where host devices are looked up (sysfs under it; tests use fake trees).
    """
    facts = facts or read_host_facts()
    accel = choose_accelerator(spec.accelerator, facts.kvm)
    qemu = qemu_binary(facts, spec.arch)
    for i, h in enumerate(spec.host_devices):
        try:
            pci_device_dir(h.address, host_root)
        except HostError as e:
            raise SpecError(f"host_devices[{i}].address", str(e)) from None
    concrete = with_image(choose_transports(spec), image_cache)
    builtin, wake_port = _image_traits(concrete)
    if spec.ssh and not builtin and spec.ssh_key is None:
        raise SpecError(
            "ssh_key",
            "a guest pyqvm did not build needs the private key its SSH server accepts "
            "(and ssh_user); only the built-in image gets keys made by pyqvm",
        )
    if spec.pyqvm_guest and concrete.shares:
        concrete = _mount_at_boot(concrete)
    concrete = pick_machine(concrete, accel, facts)
    if concrete.firmware == "ovmf" and concrete.ovmf_code is None:
        concrete = with_uefi(concrete, facts)
    if spec.kernel is not None:
        check_kernel(spec)
    return Resolved(
        spec=concrete,
        accel=accel,
        qemu=qemu,
        facts=facts,
        builtin_guest=builtin,
        wake_port=wake_port,
    )


def with_uefi(spec: VMSpec, facts: HostFacts) -> VMSpec:
    """``spec`` with the UEFI code image (and, for Secure Boot, the variable store with
    keys enrolled) that QEMU's firmware descriptors give for its arch and machine
    (`pyqvm.host.firmware`); `HostError` saying what to install when none fits."""
    machine = spec.effective_machine
    sb = spec.secure_boot
    keys = sb and spec.enrolled_keys
    fw = choose_firmware(facts.firmware, spec.arch, machine, secure_boot=sb, enrolled_keys=keys)
    if fw is None:
        info = arch_info(spec.arch)
        what = "UEFI firmware" + (" with Secure Boot" if sb else "")
        what += " and keys enrolled" if keys else ""
        raise HostError(
            f'firmware = "ovmf": no {what} for {spec.arch} on {machine} among QEMU\'s '
            "firmware descriptors (/usr/share/qemu/firmware, /etc/qemu/firmware); install "
            f"it ({install_hint(info.firmware_package)}), or set ovmf_code to its code image"
        )
    log.debug("UEFI firmware for %s %s: %s (%s)", spec.arch, machine, fw.code, fw.descriptor)
    if sb and spec.ovmf_vars is None:
        if fw.vars_template is None:
            raise HostError(f"{fw.descriptor} names no variable store template for its keys")
        return dataclasses.replace(spec, ovmf_code=fw.code, ovmf_vars=fw.vars_template)
    return dataclasses.replace(spec, ovmf_code=fw.code)


def _image_traits(concrete: VMSpec) -> tuple[bool, bool]:
    """Of the built image a concrete spec (`with_image`'s) boots: whether it is pyqvm's
    busybox guest, and whether it runs pyqvm-wake on the wake port. Such a spec names the
    image's kernel and has its disk ``root`` (a clone's spec and a restored VM's are made
    so too); the image's kernel without that disk is a guest of the user's own."""
    if concrete.kernel is None or not any(d.id == IMAGE_DISK_ID for d in concrete.disks):
        return False, False
    from pyqvm import image  # the launcher touches image/ only to find a built image

    img = image.image_of_kernel(concrete.kernel.kernel)
    if img is None:
        return False, False
    return img.kind == "busybox", img.wake_port and concrete.guest_agent
