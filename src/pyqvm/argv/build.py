"""Assemble the whole ``qemu-system-*`` argv from a spec and per-launch facts.

`build_argv` is a pure function: everything it needs about this launch
(accelerator chosen, inherited fd numbers, runtime paths) comes in a
`LaunchContext`. It always starts QEMU with ``-nodefaults -no-user-config``
so the guest hardware is exactly what the spec says, with no display and no
network listener unless asked.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pyqvm.argv.devices import (
    DiskFile,
    anonymous_ram,
    disk_args,
    hostdev_args,
    hotplug_port_args,
    net_args,
    pv_extra_args,
    share_args,
    uses_ide,
    uses_virtiofs,
    virtio,
    vmgenid_args,
)
from pyqvm.argv.escape import OptValue, opts, qjson
from pyqvm.errors import SpecError
from pyqvm.spec import VMSpec
from pyqvm.spec.arches import arch_info
from pyqvm.spec.fields import gdb_tcp_address
from pyqvm.spec.machines import MACHINE_TYPES

AGENT_PORT_NAME = "org.qemu.guest_agent.0"
WAKE_PORT_NAME = "org.pyqvm.wake.0"  # pyqvm-wake's, in pyqvm's own images (pyqvm.ops.wake)
SANDBOX = {
    "obsolete": "deny",
    "elevateprivileges": "deny",
    "spawn": "deny",
    "resourcecontrol": "deny",
}


#: The id of the guest RAM's backend when it is a file (`RamFile`).
RAM_BACKEND_ID = "pq-ram"

#: Under TCG the guest's RAM is this much past its MiB, so it is not a whole number of
#: 256 KiB: QEMU before 9.0 syncs the dirty bitmap of such a block in 64-page words and
#: forgets to reset TCG's TLB dirty state afterwards, so guest stores after a sync go
#: untracked and a live migration hands the destination stale pages (QEMU 03bfc2188f,
#: "physmem: Fix migration dirty bitmap coherency with TCG memory access"). Any other
#: size takes the page-by-page sync, which resets the TLB. 8 KiB: ``-m`` is in 8 KiB.
TCG_RAM_PAD = 8 * 1024


def ram_bytes(spec: VMSpec, accel: str) -> int:
    """The guest's boot RAM in bytes: ``spec.memory`` MiB, plus `TCG_RAM_PAD` under TCG."""
    assert isinstance(spec.memory, int)
    return (spec.memory << 20) + (TCG_RAM_PAD if accel == "tcg" else 0)


def _kib(n: int) -> str:
    return f"{n >> 10}K"


@dataclass(frozen=True, slots=True)
class RamFile:
    """Guest RAM in a file (``memory-backend-file``) instead of anonymous memory.

    ``share=True``: the guest's writes reach the file (a template while it runs).
    ``share=False``: the file is mapped privately, copy-on-write (a clone: its
    writes stay its own, and the pages it only reads are the page cache's, shared
    with every other clone of the same file).
    """

    path: Path
    share: bool


@dataclass(frozen=True, slots=True)
class LaunchContext:
    """Facts of one launch that the spec does not hold."""

    qemu: Path
    accel: Literal["kvm", "tcg"]
    qmp_fd: int
    console_log: Path
    console_fd: int | None = None  # the serial console's live end (pyqvm's ConsolePort)
    agent_fd: int | None = None
    wake_fd: int | None = None  # pyqvm-wake's port (WAKE_PORT_NAME), if the image has it
    disk_files: Mapping[str, DiskFile] = field(default_factory=dict)
    tsc_khz: int | None = None
    incoming: str | None = None
    ram: RamFile | None = None
    share_sockets: Mapping[str, Path] = field(default_factory=dict)  # tag -> virtiofsd's
    gdb_socket: Path | None = None  # with spec.gdb = True
    vde_sockets: Mapping[str, Path] = field(default_factory=dict)  # private NIC id -> switch
    append_extra: tuple[str, ...] = ()  # for the kernel command line (pyqvm.ip=...)
    fw_cfg: Mapping[str, Path] = field(default_factory=dict)  # name -> file (SSH keys)
    seed: Path | None = None  # the cloud-init seed volume (pyqvm.launch.seed), a read-only disk
    efi_vars: Path | None = None  # this launch's copy of spec.ovmf_vars (UEFI's variables)
    tpm_socket: Path | None = None  # swtpm's (pyqvm.launch.swtpm), with spec.tpm
    tb_size: int | None = None  # MiB of TCG's translation cache; None: QEMU's 1 GiB


def console_chardev(ctx: LaunchContext) -> str:
    """The serial console's backend: always logged to ``console_log``; with a
    ``console_fd``, also one end of a socket pair whose other end pyqvm holds (typing into
    the guest, ``expect``, interactive consoles: `pyqvm.channels.console.ConsolePort`)."""
    # (log)append: QEMU would truncate what pyqvm put there first (a clone: its template's boot).
    if ctx.console_fd is None:
        return opts("file", {"id": "pq-console", "path": str(ctx.console_log), "append": True})
    return opts(
        "socket",
        {
            "id": "pq-console",
            "fd": ctx.console_fd,
            "logfile": str(ctx.console_log),
            "logappend": True,
        },
    )


def kernel_append(spec: VMSpec, ctx: LaunchContext) -> str:
    """The kernel command line, plus what the machine type needs to boot reliably."""
    assert spec.kernel is not None
    append = spec.kernel.append  # the user's text as given: never stripped or re-split
    if ctx.append_extra:
        append = " ".join([append, *ctx.append_extra]) if append else " ".join(ctx.append_extra)
    # microvm has no HPET or PM timer: without a known TSC rate the guest's
    # calibration against the PIT can hang under TCG (about 1 boot in 5).
    if spec.effective_machine == "microvm" and ctx.tsc_khz and "tsc_early_khz=" not in append:
        append = f"{append} tsc_early_khz={ctx.tsc_khz}".strip()
    # A vmlinux's symbols are at their link addresses only without KASLR.
    if spec.gdb is not False and "kaslr" not in append.split():
        append = f"{append} nokaslr".strip()
    return append


def gdb_args(spec: VMSpec, ctx: LaunchContext) -> list[str]:
    """QEMU's gdbstub on its own chardev: a unix socket unless the spec names a TCP address."""
    if spec.gdb is False:
        return []
    chardev: dict[str, OptValue] = {"id": "pq-gdb", "server": True, "wait": False}
    if spec.gdb is True:
        if ctx.gdb_socket is None:
            raise ValueError("gdb is on but no gdb socket path was given")
        chardev["path"] = str(ctx.gdb_socket)
    else:
        host, port = gdb_tcp_address(spec.gdb)
        chardev |= {"host": host, "port": str(port)}
    return ["-chardev", opts("socket", chardev), "-gdb", "chardev:pq-gdb"]


def accel_arg(ctx: LaunchContext) -> str:
    """``-accel``: the accelerator, under TCG with ``tb-size`` when the launch caps it (host
    memory only: the guest sees no difference, and a migration stream does not carry it)."""
    if ctx.accel == "tcg" and ctx.tb_size is not None:
        return opts("tcg", {"tb-size": ctx.tb_size})
    return ctx.accel


def cpu_arg(spec: VMSpec, accel: str) -> str | None:
    """The ``-cpu`` value: the host CPU with PV features under KVM, the arch's TCG choice
    (`ArchInfo.tcg_cpu`; QEMU's default on x86) under TCG."""
    if spec.cpu is not None:
        return spec.cpu
    if accel != "kvm":
        return arch_info(spec.arch).tcg_cpu
    if spec.arch != "x86_64":
        return "host"
    props: dict[str, str | bool | None] = {}
    if spec.profile == "emulated":
        # Full virtualization: the guest sees plain hardware, no KVM signature or PV clock.
        props |= {"kvm": False, "kvmclock": False}
    else:
        props |= {"kvmclock": True, "kvm-pv-eoi": True}
        if spec.guest_os == "windows":
            props |= {
                "hv-relaxed": True,
                "hv-vapic": True,
                "hv-spinlocks": "0x1fff",
                "hv-time": True,
                "hv-synic": True,
                "hv-stimer": True,
                "hv-vpindex": True,
            }
    return opts("host", props)


def machine_arg(spec: VMSpec, accel: str) -> str:
    # Guest RAM is always the backend RAM_BACKEND_ID, so that its migration stream names
    # the same RAM block whether it lives in a file (a template, a clone) or not: any two
    # pyqvm VMs of one spec can migrate into each other, and a clone can be saved.
    props: dict[str, str | bool | None] = {"memory-backend": RAM_BACKEND_ID}
    if spec.effective_machine == "q35" and not uses_ide(spec):
        # The board's AHCI controller and SMBus are not in the spec: leave them out
        # (and SeaBIOS does not probe them, which saves boot time under TCG).
        props |= {"sata": False, "smbus": False}
    if spec.firmware == "ovmf":
        props["pflash0"] = "pq-ovmf-code"
        if spec.ovmf_vars is not None:
            props["pflash1"] = "pq-ovmf-vars"
    if spec.secure_boot and spec.arch == "x86_64":
        props["smm"] = True  # what keeps the guest from writing UEFI's keys itself
    if spec.effective_machine == "virt":
        # GICv3: more than 8 vCPUs, and what KVM hosts have ("host" takes theirs).
        props["gic-version"] = "host" if accel == "kvm" else "3"
    return opts(spec.effective_machine, props)


def memory_arg(spec: VMSpec, accel: str) -> str:
    """``-m``: the boot size, plus ``slots``/``maxmem`` when memory may be hot-added."""
    size = ram_bytes(spec, accel)
    if spec.max_memory is None:
        return _kib(size)
    # maxmem carries the pad too: the room for DIMMs stays max_memory - memory exactly.
    assert isinstance(spec.max_memory, int) and isinstance(spec.memory, int)
    maxmem = size + ((spec.max_memory - spec.memory) << 20)
    return opts(_kib(size), {"slots": spec.memory_slots, "maxmem": _kib(maxmem)})


def ram_object(spec: VMSpec, accel: str, ram: RamFile | None) -> str:
    """The ``-object`` of the guest's boot RAM (as ``-m`` sizes it): anonymous memory, or a
    file (`RamFile`)."""
    size = ram_bytes(spec, accel)
    if ram is None:
        return qjson(anonymous_ram(spec, RAM_BACKEND_ID, size))
    return qjson(
        {
            "qom-type": "memory-backend-file",
            "id": RAM_BACKEND_ID,
            "size": size,
            "mem-path": str(ram.path),
            "share": ram.share,
        }
    )


def smp_arg(spec: VMSpec) -> str:
    """``-smp``: the boot vCPUs, plus ``maxcpus`` when vCPUs may be hot-added."""
    if spec.max_smp is None or spec.max_smp == spec.smp:
        return str(spec.smp)
    return opts(str(spec.smp), {"maxcpus": spec.max_smp})


def _machine(spec: VMSpec, ctx: LaunchContext) -> list[str]:
    """QEMU itself: the machine, its accelerator, memory, vCPUs, and no defaults."""
    argv = [
        str(ctx.qemu),
        "-nodefaults",
        "-no-user-config",
        "-name",
        opts(spec.name, {"process": f"pyqvm-{spec.name}"}),
        "-machine",
        machine_arg(spec, ctx.accel),
        "-accel",
        accel_arg(ctx),
        "-m",
        memory_arg(spec, ctx.accel),
        "-smp",
        smp_arg(spec),
        "-display",
        "none",
        "-object",
        ram_object(spec, ctx.accel, ctx.ram),
    ]
    if cpu := cpu_arg(spec, ctx.accel):
        argv += ["-cpu", cpu]
    if spec.sandbox:
        argv += ["-sandbox", opts("on", SANDBOX)]
    return argv


def _boot(spec: VMSpec, ctx: LaunchContext) -> list[str]:
    """UEFI's code image, or the kernel booted directly."""
    argv = []
    if spec.firmware == "ovmf":
        assert spec.ovmf_code is not None
        code = {"driver": "file", "node-name": "pq-ovmf-code", "read-only": True,
                "filename": str(spec.ovmf_code)}  # fmt: skip
        argv += ["-blockdev", qjson(code)]
    if spec.firmware == "ovmf" and spec.ovmf_vars is not None:
        if ctx.efi_vars is None:
            raise ValueError("ovmf_vars is set but the launch made no copy of it (efi_vars)")
        store = {"driver": "file", "node-name": "pq-ovmf-vars", "filename": str(ctx.efi_vars)}
        argv += ["-blockdev", qjson(store)]
    if spec.secure_boot and spec.arch == "x86_64":  # only SMM may write the variables' flash
        argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    if spec.kernel is not None:
        argv += ["-kernel", str(spec.kernel.kernel)]
        if spec.kernel.initrd is not None:
            argv += ["-initrd", str(spec.kernel.initrd)]
        if append := kernel_append(spec, ctx):
            argv += ["-append", append]
    return argv


def _channels(spec: VMSpec, ctx: LaunchContext) -> list[str]:
    """QMP and the serial console. QMP arrives on an inherited, already connected socket,
    so there is no window in which a client could race QEMU."""
    return [
        "-chardev",
        opts("socket", {"id": "pq-qmp", "fd": ctx.qmp_fd}),
        "-mon",
        opts(None, {"chardev": "pq-qmp", "mode": "control"}),
        "-chardev",
        console_chardev(ctx),
        "-serial",
        "chardev:pq-console",
    ]


def _serial_port(chardev: str, fd: int, name: str) -> list[str]:
    port = {"driver": "virtserialport", "bus": "pq-vser.0", "chardev": chardev, "name": name}
    return ["-chardev", opts("socket", {"id": chardev, "fd": fd}), "-device", qjson(port)]


def _agent_ports(spec: VMSpec, ctx: LaunchContext) -> list[str]:
    """The guest agent's port and pyqvm-wake's, on one virtio-serial bus."""
    argv = []
    if spec.guest_agent:
        if ctx.agent_fd is None:
            raise ValueError("guest_agent is on but no agent fd was given")
        argv += ["-device", qjson({"driver": virtio(spec, "serial"), "id": "pq-vser"})]
        argv += _serial_port("pq-qga", ctx.agent_fd, AGENT_PORT_NAME)
    if ctx.wake_fd is not None:
        if not spec.guest_agent:
            raise ValueError("the wake port shares the agent's virtio-serial bus")
        argv += _serial_port("pq-wake", ctx.wake_fd, WAKE_PORT_NAME)
    return argv


def _fw_cfg(spec: VMSpec, ctx: LaunchContext) -> list[str]:
    argv = []
    for name, path in ctx.fw_cfg.items():
        argv += ["-fw_cfg", opts(None, {"name": name, "file": str(path)})]
    return argv


def _shares(spec: VMSpec, ctx: LaunchContext) -> list[str]:
    argv = share_args(spec, ctx.share_sockets)
    if spec.effective_machine == "microvm" and uses_virtiofs(spec):
        # microvm's virtio-mmio is legacy (v1) by default; virtiofsd's libvhost-user
        # takes modern devices only (it panics on a legacy one).
        argv += ["-global", "virtio-mmio.force-legacy=false"]
    return argv


def _incoming(spec: VMSpec, ctx: LaunchContext) -> list[str]:
    return [] if ctx.incoming is None else ["-incoming", ctx.incoming]


#: The sections of an argv, in order; each reads the spec and the launch's context.
def _panic(spec: VMSpec, ctx: LaunchContext) -> list[str]:
    """A pvpanic device where the machine has one: a guest that panics tells QEMU
    (``GUEST_PANICKED``), and QEMU pauses it there, for a look, instead of powering off."""
    device = MACHINE_TYPES[spec.effective_machine].pvpanic
    if device is None:
        return []
    return ["-device", qjson({"driver": device, "id": "pq-panic"}), "-action", "panic=pause"]


def _tpm(spec: VMSpec, ctx: LaunchContext) -> list[str]:
    """A TPM 2.0 backed by swtpm (`pyqvm.launch.swtpm`): CRB on a PC, TIS on aarch64."""
    if not spec.tpm:
        return []
    if ctx.tpm_socket is None:
        raise ValueError("tpm is on but the launch has no swtpm socket")
    device = "tpm-crb" if spec.arch == "x86_64" else "tpm-tis-device"
    return [
        "-chardev", opts("socket", {"id": "pq-tpm-chr", "path": str(ctx.tpm_socket)}),
        "-tpmdev", opts("emulator", {"id": "pq-tpm", "chardev": "pq-tpm-chr"}),
        "-device", qjson({"driver": device, "id": "pq-tpm-dev", "tpmdev": "pq-tpm"}),
    ]  # fmt: skip


#: The graphics card of each `VMSpec.display`.
DISPLAY_DEVICES = {"vga": "VGA", "virtio-gpu": "virtio-gpu-pci"}


def _display(spec: VMSpec, ctx: LaunchContext) -> list[str]:
    """A graphics card, and a VNC server with no listener (``pyqvm vnc`` adds one): no
    window, no port. aarch64's board has no keyboard of its own: a virtio one."""
    if spec.display == "none":
        return []
    argv = [
        "-vnc",
        "none",
        "-device",
        qjson({"driver": DISPLAY_DEVICES[spec.display], "id": "pq-display"}),
    ]
    if spec.arch != "x86_64":
        argv += ["-device", qjson({"driver": "virtio-keyboard-pci", "id": "pq-keyboard"})]
    return argv


SECTIONS: tuple[Callable[[VMSpec, LaunchContext], list[str]], ...] = (
    _machine,
    _boot,
    _channels,
    _agent_ports,
    lambda spec, ctx: disk_args(spec, ctx.disk_files, seed=ctx.seed),
    lambda spec, ctx: net_args(spec, ctx.accel, ctx.vde_sockets),
    _fw_cfg,
    lambda spec, ctx: pv_extra_args(spec),
    lambda spec, ctx: vmgenid_args(spec),
    lambda spec, ctx: hostdev_args(spec),
    _panic,
    _tpm,
    _display,
    _shares,
    gdb_args,
    lambda spec, ctx: hotplug_port_args(spec),
    _incoming,
    lambda spec, ctx: list(spec.extra_args),  # last, verbatim: the user's word wins
)


def build_argv(spec: VMSpec, ctx: LaunchContext) -> list[str]:
    """The complete argv (a list, never a shell string) for ``spec``: its `SECTIONS`."""
    if spec.image is not None:
        raise SpecError(
            "image", "resolve the built-in image before building argv (pyqvm.vm does this)"
        )
    return [arg for section in SECTIONS for arg in section(spec, ctx)]
