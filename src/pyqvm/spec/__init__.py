"""The VM description: frozen dataclasses, validated when built.

A spec says *what* the guest is; it knows nothing of argv or processes.
Every check runs in ``__post_init__`` so a spec that exists is valid, and an
invalid one fails before QEMU starts with a `SpecError` naming the field::

    VMSpec(memory="512X")  ->  SpecError("memory: '512X' is not a size; use e.g. 512M or 2G")

Paths are made absolute when the spec is built (relative to the working
directory, or to the TOML file's directory when loaded from TOML). Loading from
TOML or plain data, and turning a spec back into data, is `pyqvm.spec.io`'s.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from pyqvm.errors import SpecError
from pyqvm.spec.arches import arch_info
from pyqvm.spec.cloudinit import CloudInit
from pyqvm.spec.fields import (
    MAX_MEMORY_MIB,
    SSH_USER_RE,
    absolute_path,
    boolean,
    check_id,
    choice,
    gdb_tcp_address,
    normalize_pci_address,
    parse_size_mib,
    set_field,
    show,
    text,
    writable_file,
)
from pyqvm.spec.machines import INTERFACE_HINTS, MACHINE_TYPES, Feature, MachineInfo
from pyqvm.spec.parts import Disk, HostDevice, KernelBoot, Network, PortForward
from pyqvm.spec.shares import Share, with_defaults

Arch = Literal["x86_64", "aarch64"]
Machine = Literal["auto", "q35", "pc", "microvm", "virt"]
ConcreteMachine = Literal["q35", "pc", "microvm", "virt"]
Accelerator = Literal["auto", "kvm", "tcg"]
Profile = Literal["virtio", "emulated", "passthrough"]
Firmware = Literal["seabios", "ovmf"]
Display = Literal["none", "vga", "virtio-gpu"]
BootDevice = Literal["disk", "cdrom", "network"]
GuestOS = Literal["linux", "windows", "other"]
Readiness = Literal["auto", "agent", "console", "none"]
ExecVia = Literal["auto", "agent", "serial"]
ImageFlavour = Literal["default", "full", "debian"]

ARCHES: tuple[str, ...] = get_args(Arch)
MACHINES: tuple[str, ...] = get_args(Machine)
PROFILES: tuple[str, ...] = get_args(Profile)

#: The id of the built-in image's disk, attached first when ``image`` is set.
IMAGE_DISK_ID = "root"
#: QEMU keeps block node names in 32 bytes; an overlaid disk's base is ``<id>-base``.
NODE_NAME_MAX = 31
_BASE_SUFFIX = "-base"
#: Ids pyqvm gives its own objects: every ``pq-*``, the virtio-scsi bus, the CD-ROMs.
_RESERVED_ID = re.compile(r"pq-.*|scsi0|cd[0-9]+")


#: The most q35 pcie-root-ports `VMSpec.hotplug_slots` may reserve (one PCIe slot each).
MAX_HOTPLUG_SLOTS = 16


@dataclass(frozen=True, slots=True)
class VMSpec:
    """A whole VM. Defaults give a small TCG-friendly virtio guest.

    ``image`` names a built-in guest image flavour (``pyqvm image build``): it
    supplies the kernel, the initrd and a base disk (attached first, through an
    ephemeral overlay). Without ``image`` and ``kernel`` the VM boots firmware.
    """

    name: str = "pyqvm"
    arch: Arch = "x86_64"
    machine: Machine = "auto"
    accelerator: Accelerator = "auto"
    cpu: str | None = None
    smp: int = 1
    memory: int | str = 512  # MiB, or a size string ("512M", "2G"); always an int MiB once built
    # Hotplug room (see docs/hotplug.md): q35 pcie-root-ports kept free, vCPUs up to
    # max_smp, memory up to max_memory (MiB once built) in memory_slots DIMM slots.
    hotplug_slots: int = 0
    max_smp: int | None = None
    max_memory: int | str | None = None
    memory_slots: int = 0
    profile: Profile = "virtio"
    guest_os: GuestOS = "linux"
    image: ImageFlavour | None = None
    kernel: KernelBoot | None = None
    firmware: Firmware = "seabios"
    ovmf_code: Path | None = None
    # UEFI's variable store template (keys enrolled for Secure Boot): each launch writes a
    # copy of its own. None: the firmware descriptor's when secure_boot, else none at all.
    ovmf_vars: Path | None = None
    # Secure Boot enforced (OVMF with Microsoft's keys enrolled, SMM on), and a virtual
    # TPM 2.0 (swtpm, one per VM, gone with it): what current unmodified systems require.
    secure_boot: bool = False
    # With secure_boot: the firmware build with Microsoft's keys enrolled (what shim and
    # Windows are signed for), or, False, one with an empty store to enroll your own.
    enrolled_keys: bool = True
    tpm: bool = False
    disks: tuple[Disk, ...] = ()
    cdroms: tuple[Path, ...] = ()
    # What the firmware tries, in order: the first disk, the first CD-ROM, the network (PXE).
    # Empty: a NIC with a bootfile, then the first disk.
    boot_order: tuple[BootDevice, ...] = ()
    networks: tuple[Network, ...] = ()
    host_devices: tuple[HostDevice, ...] = ()
    shares: tuple[Share, ...] = ()
    rng: bool = True
    balloon: bool = True
    # QEMU's vmgenid (ACPI: x86 pc and q35): a restored clone's kernel reseeds its RNG when
    # the generation ID changes (CONFIG_VMGENID). None: on wherever the machine has it.
    vmgenid: bool | None = None
    guest_agent: bool = True
    # A graphics card, for screenshots and keys (`pyqvm.ops.screen`); never a window, and a
    # VNC listener only when asked (``pyqvm vnc``).
    display: Display = "none"
    serial_log: Path | None = None
    ready: Readiness = "auto"
    ready_pattern: str | None = None
    ready_timeout: float = 120.0
    sandbox: bool = True
    # QEMU's gdbstub: True serves it on a unix socket in the runtime dir; "HOST:PORT" on TCP.
    gdb: bool | str = False
    # An SSH server reachable through a port forward (`pyqvm.ops.ssh`): the built-in guest
    # runs one with keys pyqvm makes per VM; a guest of your own names its user and key.
    ssh: bool = False
    ssh_user: str = "root"
    ssh_key: Path | None = None
    # How `run` reaches the guest: its agent, or a shell on its serial console, for a guest
    # with nothing of ours (`pyqvm.ops.serialshell`); "auto": the agent if guest_agent is on.
    exec_via: ExecVia = "auto"
    # Who logs in on the serial console when it shows a login prompt (exec_via "serial").
    console_user: str = "root"
    console_password: str | None = None
    # A NoCloud seed for a guest with cloud-init (`pyqvm.spec.cloudinit`), attached by
    # `pyqvm.launch.seed`.
    cloud_init: CloudInit | None = None
    extra_args: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(
            r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", self.name
        ):
            raise SpecError("name", f"{self.name!r}: use 1-64 letters, digits, '-', '.', '_'")
        choice(self.arch, ARCHES, "arch")
        choice(self.machine, MACHINES, "machine")
        choice(self.accelerator, get_args(Accelerator), "accelerator")
        choice(self.profile, PROFILES, "profile")
        choice(self.guest_os, get_args(GuestOS), "guest_os")
        choice(self.firmware, get_args(Firmware), "firmware")
        choice(self.display, get_args(Display), "display")
        choice(self.ready, get_args(Readiness), "ready")
        if self.image is not None:
            choice(self.image, get_args(ImageFlavour), "image")
        if self.cpu is not None and (
            not isinstance(self.cpu, str)
            or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+=,-]*", self.cpu)
        ):
            raise SpecError(
                "cpu", f"{self.cpu!r} is not a CPU model (see qemu-system-x86_64 -cpu help)"
            )
        if isinstance(self.smp, bool) or not isinstance(self.smp, int) or not 1 <= self.smp <= 255:
            raise SpecError("smp", f"{show(self.smp)} must be a whole number from 1 to 255")
        set_field(self, "memory", parse_size_mib(self.memory, "memory"))
        self._check_hotplug_room()
        t = self.ready_timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < math.inf:
            raise SpecError("ready_timeout", f"{show(t)} must be a positive number of seconds")
        for flag in ("rng", "balloon", "guest_agent", "sandbox"):
            boolean(getattr(self, flag), flag)
        if self.ready_pattern is not None:
            text(self.ready_pattern, "ready_pattern")
        if not isinstance(self.gdb, bool):
            gdb_tcp_address(self.gdb)
        boolean(self.ssh, "ssh")
        if not isinstance(self.ssh_user, str) or not SSH_USER_RE.fullmatch(self.ssh_user):
            raise SpecError("ssh_user", f"{show(self.ssh_user)} is not a user name, e.g. root")
        if self.ssh_key is not None:
            key = absolute_path(self.ssh_key, "ssh_key")
            if not os.access(key, os.R_OK):
                raise SpecError("ssh_key", f"cannot read '{key}'; give a private key file of yours")
            set_field(self, "ssh_key", key)

        for name in ("disks", "cdroms", "boot_order", "networks", "host_devices", "extra_args"):
            set_field(self, name, tuple(getattr(self, name)))
        set_field(self, "disks", tuple(_with_id(d, f"disk{i}") for i, d in enumerate(self.disks)))
        set_field(
            self, "networks", tuple(_with_id(n, f"net{i}") for i, n in enumerate(self.networks))
        )
        set_field(
            self,
            "host_devices",
            tuple(_with_id(h, f"hostdev{i}") for i, h in enumerate(self.host_devices)),
        )
        set_field(self, "shares", with_defaults(tuple(self.shares)))
        set_field(
            self,
            "cdroms",
            tuple(absolute_path(c, f"cdroms[{i}]") for i, c in enumerate(self.cdroms)),
        )
        if self.ovmf_code is not None:
            set_field(self, "ovmf_code", absolute_path(self.ovmf_code, "ovmf_code"))
        if self.ovmf_vars is not None:
            set_field(self, "ovmf_vars", absolute_path(self.ovmf_vars, "ovmf_vars"))
        boolean(self.secure_boot, "secure_boot")
        boolean(self.enrolled_keys, "enrolled_keys")
        boolean(self.tpm, "tpm")
        if self.serial_log is not None:
            log_path = absolute_path(self.serial_log, "serial_log", must_exist=False)
            writable_file(log_path, "serial_log")
            set_field(self, "serial_log", log_path)
        for i, a in enumerate(self.extra_args):
            text(a, f"extra_args[{i}]")

        self._check_consistency()

    def _check_ids(self) -> None:
        """Ids QEMU would refuse at launch: pyqvm's own, and block node names it cannot hold."""
        users = [(f"disks[{i}].id", d.id) for i, d in enumerate(self.disks)]
        users += [(f"networks[{i}].id", n.id) for i, n in enumerate(self.networks)]
        users += [(f"host_devices[{i}].id", h.id) for i, h in enumerate(self.host_devices)]
        for where, ident in users:
            if _RESERVED_ID.fullmatch(ident):
                raise SpecError(
                    where, f"{ident!r} is an id pyqvm uses itself (pq-*, scsi0, cdN); pick another"
                )
        bases = {f"{d.id}{_BASE_SUFFIX}": i for i, d in enumerate(self.disks) if d.ephemeral}
        for i, d in enumerate(self.disks):
            room = NODE_NAME_MAX - (len(_BASE_SUFFIX) if d.ephemeral else 0)
            if len(d.id.encode()) > room:
                raise SpecError(
                    f"disks[{i}].id",
                    f"{d.id!r} is too long: QEMU takes at most {room} characters here",
                )
            if d.id in bases:
                raise SpecError(
                    f"disks[{i}].id",
                    f"{d.id!r} is the name of disks[{bases[d.id]}]'s base node; pick another",
                )
        seen: dict[tuple[str, str, int], str] = {}
        for i, n in enumerate(self.networks):
            for j, f in enumerate(n.forwards):
                key = (f.protocol, f.host_address, f.host_port)
                where = f"networks[{i}].forwards[{j}]"
                if key in seen:
                    raise SpecError(
                        where,
                        f"{f.protocol} {f.host_address or '*'}:{f.host_port} is already "
                        f"forwarded by {seen[key]}",
                    )
                seen[key] = where
        private: dict[str, int] = {}
        for i, n in enumerate(self.networks):
            if n.mode == "private" and n.name is not None:
                if n.name in private:
                    raise SpecError(
                        f"networks[{i}].name",
                        f"networks[{private[n.name]}] is on private network {n.name!r} "
                        "already; one NIC per network",
                    )
                private[n.name] = i

    def _check_consistency(self) -> None:
        if self.image is not None and self.kernel is not None:
            raise SpecError("image", "give either image (built-in guest) or kernel, not both")
        if self.ssh and not any(n.mode == "user" for n in self.networks):
            raise SpecError(
                "ssh",
                "ssh reaches the guest through a user network's port forward; add "
                'networks = [{mode = "user"}]',
            )
        for i, s in enumerate(self.shares):
            if s.transport == "9p" and self.image == "default":
                raise SpecError(
                    f"shares[{i}].transport",
                    'the default image\'s kernel has no 9p; use image = "full" or '
                    'transport = "virtiofs" (or "auto")',
                )
        machine = self.effective_machine
        if self.arch != "x86_64":
            self._check_arm()
        if machine not in arch_info(self.arch).machines:
            machines = ", ".join(arch_info(self.arch).machines)
            raise SpecError(
                "machine", f"{machine!r} is not a machine of {self.arch}; use {machines}"
            )
        self._check_machine(MACHINE_TYPES[machine])
        if self.vmgenid is not None:
            boolean(self.vmgenid, "vmgenid")
            if self.vmgenid and not self.has_vmgenid:
                raise SpecError(
                    "vmgenid", f"needs ACPI: machine q35 or pc on x86_64, not {machine}"
                )
        self._check_boot_order()
        self._check_firmware_devices()
        self._check_exec_via()
        if self.profile == "passthrough" and not self.host_devices:
            raise SpecError(
                "host_devices",
                'profile "passthrough" needs at least one host device, e.g. '
                'host_devices = [{ address = "0000:01:00.0" }]',
            )
        seen: dict[str, str] = {}
        ids = [(f"disks[{i}].id", d.id) for i, d in enumerate(self.disks)]
        ids += [(f"networks[{i}].id", n.id) for i, n in enumerate(self.networks)]
        ids += [(f"host_devices[{i}].id", h.id) for i, h in enumerate(self.host_devices)]
        for where, ident in ids:
            if ident in seen:
                raise SpecError(where, f"{ident!r} is already used by {seen[ident]}")
            seen[ident] = where
        self._check_ids()
        addrs = [h.address for h in self.host_devices]
        for i, a in enumerate(addrs):
            if a in addrs[:i]:
                raise SpecError(
                    f"host_devices[{i}].address",
                    f"{a} is listed twice; a device goes to one guest once",
                )
        if self.ready == "console" and not self.ready_pattern:
            raise SpecError("ready_pattern", 'ready = "console" needs a ready_pattern to look for')
        if self.ready == "agent" and not self.guest_agent:
            raise SpecError("ready", 'ready = "agent" needs guest_agent = true')
        if self.cloud_init is not None:
            if not isinstance(self.cloud_init, CloudInit):
                raise SpecError("cloud_init", "expected a table (user_data, meta_data, ...)")
            if self.pyqvm_guest:
                raise SpecError(
                    "cloud_init",
                    'the built-in busybox guest has no cloud-init; use image = "debian" or '
                    "a cloud image of your own",
                )
        if self.image is not None:
            for i, d in enumerate(self.disks):
                if d.id == IMAGE_DISK_ID:
                    raise SpecError(
                        f"disks[{i}].id", f"{d.id!r} is the built-in image's disk; pick another id"
                    )

    def _check_exec_via(self) -> None:
        """How commands reach the guest, and who logs in on its serial console."""
        choice(self.exec_via, get_args(ExecVia), "exec_via")
        if not isinstance(self.console_user, str) or not SSH_USER_RE.fullmatch(self.console_user):
            raise SpecError(
                "console_user", f"{show(self.console_user)} is not a user name, e.g. root"
            )
        if self.console_password is not None:
            text(self.console_password, "console_password")
        if self.exec_via == "agent" and not self.guest_agent:
            raise SpecError(
                "exec_via", 'exec_via = "agent" needs guest_agent = true; or use "serial"'
            )

    def _check_firmware_devices(self) -> None:
        """Secure Boot, a TPM and a graphics card: what the firmware and machine can give."""
        if self.secure_boot and self.firmware != "ovmf":
            raise SpecError("secure_boot", 'Secure Boot is UEFI\'s: set firmware = "ovmf"')
        if self.secure_boot and self.arch == "x86_64" and self.effective_machine != "q35":
            raise SpecError(
                "secure_boot", 'Secure Boot on x86_64 needs SMM: machine = "q35" (or "auto")'
            )
        if self.tpm and self.effective_machine == "microvm":
            raise SpecError("tpm", f"microvm has no TPM interface; {'use q35 or pc'}")
        if self.display == "vga" and self.arch != "x86_64":
            raise SpecError("display", f'"vga" is a PC card; use "virtio-gpu" on {self.arch}')

    def _check_boot_order(self) -> None:
        have = {"disk": bool(self.disks), "cdrom": bool(self.cdroms), "network": bool(
            [n for n in self.networks if n.mode != "none"]
        )}  # fmt: skip
        for i, item in enumerate(self.boot_order):
            where = f"boot_order[{i}]"
            choice(item, get_args(BootDevice), where)
            if item in self.boot_order[:i]:
                raise SpecError(where, f"{item!r} is listed twice")
            if not have[item]:
                raise SpecError(where, f"{item!r}: the spec has no {item} to boot")
        if self.boot_order and (self.kernel is not None or self.image is not None):
            raise SpecError("boot_order", "a kernel boots directly; boot_order is for firmware")

    def boot_index(self, kind: BootDevice) -> int | None:
        """Where the firmware tries the first device of ``kind`` (QEMU's ``bootindex``);
        None: not at all, or a kernel boots directly."""
        if self.kernel is not None or self.image is not None:
            return None
        order = self.boot_order
        if not order:
            pxe = any(n.bootfile is not None for n in self.networks)
            order = ("network", "disk") if pxe else ("disk",)
        return order.index(kind) if kind in order else None

    def _check_machine(self, info: MachineInfo) -> None:
        """What the machine type cannot give (`pyqvm.spec.machines`): a feature it refuses,
        more AHCI/IDE users than its ports, a disk interface or NIC model it lacks."""
        for feature, wanted in _FEATURES.items():
            refusal = info.refuses.get(feature)
            if refusal is not None and wanted(self):
                raise SpecError(refusal.field, refusal.message)
        ports = info.block_ports
        ide_users = [f"disks[{i}]" for i, d in enumerate(self.disks) if self._on_ide(d)]
        ide_users += [f"cdroms[{i}]" for i in range(len(self.cdroms))]
        if len(ide_users) > ports:
            raise SpecError(
                ide_users[ports],
                f"machine {info.name!r} has only {ports} AHCI/IDE ports; use virtio-blk",
            )
        for i, d in enumerate(self.disks):
            if d.interface == "auto" or d.interface in info.interfaces:
                continue
            hint = INTERFACE_HINTS.get(d.interface)
            if hint is None or not info.block_ports:
                hint = f"{d.interface!r} is not available on {info.name}; use virtio-blk"
            raise SpecError(f"disks[{i}].interface", hint)
        for i, n in enumerate(self.networks):
            if n.model != "auto" and n.model not in info.nic_models:
                raise SpecError(
                    f"networks[{i}].model", f"{n.model!r} needs PCI; use virtio on {info.name}"
                )

    def _refuse(self, feature: Feature) -> None:
        """`SpecError` when this spec's machine does not have ``feature``."""
        refusal = MACHINE_TYPES[self.effective_machine].refuses.get(feature)
        if refusal is not None:
            raise SpecError(refusal.field, refusal.message)

    def _check_hotplug_room(self) -> None:
        def whole(name: str, lo: int, hi: int) -> int:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise SpecError(name, f"{v!r} must be a whole number from {lo} to {hi}")
            return v

        hotplug_slots = whole("hotplug_slots", 0, MAX_HOTPLUG_SLOTS)
        if self.max_smp is not None:
            whole("max_smp", 1, 255)
        slots = whole("memory_slots", 0, 256)
        if self.max_memory is not None:
            set_field(self, "max_memory", parse_size_mib(self.max_memory, "max_memory"))
        # From here `_refuse` asks effective_machine, which needs the numbers above checked.
        if hotplug_slots:
            self._refuse("hotplug_slots")
        if self.max_smp is not None:
            if self.max_smp < self.smp:
                raise SpecError(
                    "max_smp", f"{self.max_smp} is below smp = {self.smp}; use at least {self.smp}"
                )
            if self.max_smp > self.smp:
                self._refuse("cpu_hotplug")
        if self.max_memory is None:
            if slots:
                raise SpecError("memory_slots", "needs max_memory (the most the guest may have)")
            return
        assert isinstance(self.memory, int) and isinstance(self.max_memory, int)
        if self.max_memory < self.memory:
            raise SpecError("max_memory", f"{self.max_memory}M is below memory = {self.memory}M")
        self._refuse("memory_hotplug")

    def _on_ide(self, disk: Disk) -> bool:
        if disk.interface == "auto":
            return self.profile == "emulated"
        return disk.interface in ("ahci", "ide")

    def _check_arm(self) -> None:
        """What aarch64's virt board has no counterpart for, or pyqvm does not drive yet."""
        if self.profile == "emulated":
            raise SpecError(
                "profile",
                'profile "emulated" means PC hardware (e1000, AHCI, IDE), which an aarch64 '
                'guest has no use for; use profile = "virtio" (virt\'s own devices are PL011 '
                "and PCIe, which every profile gets)",
            )
        if self.kernel is None and self.image is None and self.firmware == "seabios":
            raise SpecError(
                "firmware",
                'SeaBIOS is PC firmware; boot an aarch64 disk with UEFI: firmware = "ovmf" '
                "(AAVMF, found through QEMU's firmware descriptors), or boot a kernel "
                "directly (set kernel or image)",
            )
        for field_name, value in (
            ("cdroms", self.cdroms),
            ("max_memory", self.max_memory),
            ("hotplug_slots", self.hotplug_slots),
        ):
            if value:
                raise SpecError(field_name, f"not supported on {self.arch} yet; leave it out")
        if self.max_smp is not None and self.max_smp > self.smp:
            raise SpecError("max_smp", f"vCPU hotplug is not supported on {self.arch} yet")
        for i, d in enumerate(self.disks):
            if d.interface in ("ahci", "ide"):
                raise SpecError(
                    f"disks[{i}].interface", f"{d.interface!r} is PC hardware; use virtio-blk"
                )
        for i, n in enumerate(self.networks):
            if n.model in ("e1000", "e1000e"):
                raise SpecError(f"networks[{i}].model", f"{n.model!r} is PC hardware; use virtio")

    @property
    def pyqvm_guest(self) -> bool:
        """Whether the guest is pyqvm's own busybox guest (image ``default`` or ``full``):
        its init reads ``pyqvm.*`` boot options and fw_cfg keys, and it has pyqvm's helpers.
        The ``debian`` image is a distribution like any other."""
        return self.image in ("default", "full")

    @property
    def has_vmgenid(self) -> bool:
        """Whether the VM gets QEMU's vmgenid device: unless ``vmgenid`` is False, on the
        machines whose ACPI tables carry it (x86 pc and q35; not microvm)."""
        return self.vmgenid is not False and MACHINE_TYPES[self.effective_machine].acpi

    @property
    def effective_machine(self) -> ConcreteMachine:
        """The machine type ``machine = "auto"`` means for this spec.

        microvm (no PCI, no firmware: the fastest boot, ~0.2 s ahead of q35 under
        TCG) for a directly booted Linux guest whose devices are all virtio-mmio
        capable and that asks for no hotplug room; pc when a disk wants IDE; q35,
        the general machine, for everything else.
        """
        if self.machine != "auto":
            return self.machine
        if self.arch == "aarch64":
            return "virt"
        if any(d.interface == "ide" for d in self.disks):
            return "pc"
        if self._needs_pci():
            return "q35"
        return "microvm"

    def _needs_pci(self) -> bool:
        """Whether anything in the spec needs a PCI machine (or is opaque to us)."""
        if self.kernel is None and self.image is None:
            return True  # firmware boot: SeaBIOS/OVMF disk boot wants PCI storage
        if self.profile != "virtio" or self.guest_os != "linux" or self.firmware != "seabios":
            return True
        if (
            self.host_devices
            or self.cdroms
            or self.extra_args
            or self.display != "none"
            or self.tpm
        ):
            return True  # extra_args are opaque: they may name PCI devices
        if self.hotplug_slots or self.max_memory is not None or self.memory_slots:
            return True
        if self.max_smp is not None and self.max_smp > self.smp:
            return True
        if any(d.interface not in ("auto", "virtio-blk") for d in self.disks):
            return True
        return any(n.model in ("e1000", "e1000e") for n in self.networks)

    @property
    def effective_exec_via(self) -> Literal["agent", "serial"]:
        """How `run` reaches the guest: ``exec_via``, where "auto" is the agent if there is
        one, else the serial console's shell."""
        if self.exec_via != "auto":
            return self.exec_via
        return "agent" if self.guest_agent else "serial"

    @property
    def effective_ready(self) -> Literal["agent", "console", "none"]:
        """The readiness check that ``ready = "auto"`` means for this spec."""
        if self.ready != "auto":
            return self.ready
        if self.ready_pattern:
            return "console"
        return (
            "agent"
            if self.guest_agent and (self.image is not None or self.kernel is not None)
            else "none"
        )


_Item = typing.TypeVar("_Item", Disk, Network, HostDevice)


#: How a spec asks for each feature a machine may refuse (`pyqvm.spec.machines`).
_FEATURES: dict[Feature, Callable[[VMSpec], bool]] = {
    "emulated": lambda s: s.profile == "emulated",
    "vfio": lambda s: bool(s.host_devices),
    "disk_boot": lambda s: s.kernel is None and s.image is None,
    "cdrom": lambda s: bool(s.cdroms),
    "display": lambda s: s.display != "none",
}


def _with_id(item: _Item, default: str) -> _Item:
    return item if item.id else dataclasses.replace(item, id=default)


__all__ = [
    "MAX_MEMORY_MIB",
    "Disk",
    "HostDevice",
    "KernelBoot",
    "Network",
    "PortForward",
    "Share",
    "VMSpec",
    "check_id",
    "normalize_pci_address",
    "parse_size_mib",
]
