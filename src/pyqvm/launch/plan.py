"""What one launch is: its options beyond the spec (`LaunchPlan`), and its argv from a
resolved spec, its runtime dir and the fds QEMU inherits.

`Machine` launches with these; `preview_argv` shows what a launch would run (``pyqvm
cmdline``) without starting anything.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pyqvm.argv.build import LaunchContext, RamFile, build_argv
from pyqvm.argv.devices import DiskFile
from pyqvm.errors import SpecError
from pyqvm.host.sshkeys import SshKeys, make_keys, ssh_keys_in
from pyqvm.launch import swtpm
from pyqvm.launch.overlays import overlay_disks, overlay_path
from pyqvm.launch.privnet import Membership, guest_cmdline, preview_memberships
from pyqvm.launch.resolve import Resolved, resolve
from pyqvm.launch.seed import SEED_FILE, seed_files, write_seed
from pyqvm.launch.virtiofs import socket_path
from pyqvm.spec import VMSpec

#: The serial console's unix socket in the runtime dir, served by `ConsolePort`.
CONSOLE_SOCKET = "console.sock"
GDB_SOCKET = "gdb.sock"
EFI_VARS = "efivars.fd"  # this launch's UEFI variables, a copy of spec.ovmf_vars
SSH_DIR = "ssh"  # the VM's key set (pyqvm.host.sshkeys)
SSH_FW_CFG_HOST_KEY = "opt/pyqvm/ssh/host_key"
SSH_FW_CFG_AUTHORIZED = "opt/pyqvm/ssh/authorized_keys"


@dataclass(frozen=True, slots=True)
class QemuMemory:
    """What QEMU spends of its own memory (not the guest's RAM), where pyqvm chooses.

    ``tb_size``: TCG's translation cache in MiB (``-accel tcg,tb-size``); None: QEMU's
    default for system emulation, 1 GiB. Only the code QEMU has generated is resident, so
    a cap bounds what a busy VM can pile up there; when it is full QEMU flushes it and
    translates again. ``transparent_hugepages``: False turns THP off for QEMU's process
    (``PR_SET_THP_DISABLE``). QEMU asks for huge pages on its code buffer and its RAM
    blocks, so each of those is resident in 2 MiB steps.
    """

    tb_size: int | None
    transparent_hugepages: bool


#: QEMU's own choices.
QEMU_DEFAULTS = QemuMemory(tb_size=None, transparent_hugepages=True)

#: A launch whose guest RAM is a file (a template, a clone of one): QEMU's own memory is
#: then nearly all a clone has to itself, so it is trimmed. THP off saves 2-3 MiB per
#: idle clone (of ~37 MiB): the code buffer and the 2 MiB ACPI table block stop filling
#: whole 2 MiB pages; the guest's RAM, a file, never had huge pages. 32 MiB of translation
#: cache holds all that clones generate here (~16 MiB after their first commands, ~19 MiB
#: after heavier work) and a template's boot (~51 MiB) flushes it; 16 MiB or less makes
#: clones flush and run slower (docs/templates.md). Read at each launch:
#: bench/template.py swaps in `QEMU_DEFAULTS` to measure the difference.
FILE_RAM = QemuMemory(tb_size=32, transparent_hugepages=False)


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    """How to launch a machine, beyond its spec.

    ``incoming``: start as a migration destination (``-incoming defer``).
    ``overlays``: an ephemeral disk's id -> an existing overlay to open instead
    of a fresh one (shared storage: the source's overlay; hard-linked into
    this runtime dir, so either side's cleanup leaves the other's disk
    intact). ``without_forwards``: leave out the NICs' host port forwards (a
    source on this host still holds the ports). ``spec``: launch this spec
    instead of the machine's (a restore: disks over the saved overlays); it
    becomes the machine's spec. ``ram``: guest RAM in a file (a template, or a
    clone of one), see `pyqvm.argv.RamFile`. ``console_prefix``: what the console
    log starts with (a clone: the template's boot, which is this guest's too).
    """

    incoming: str | None = None
    overlays: Mapping[str, Path] = field(default_factory=dict)
    without_forwards: bool = False
    spec: VMSpec | None = None
    ram: RamFile | None = None
    console_prefix: bytes = b""

    @property
    def qemu_memory(self) -> QemuMemory:
        """QEMU's own memory in this launch: `FILE_RAM` with the RAM in a file, else
        `QEMU_DEFAULTS`."""
        return FILE_RAM if self.ram is not None else QEMU_DEFAULTS

    def applied_to(self, resolved: Resolved) -> Resolved:
        """``resolved`` as this plan launches it (``without_forwards``: NICs without them)."""
        if not self.without_forwards:
            return resolved
        nets = tuple(dataclasses.replace(n, forwards=()) for n in resolved.spec.networks)
        return dataclasses.replace(resolved, spec=dataclasses.replace(resolved.spec, networks=nets))


class Channels:
    """The connected socket pairs of one launch: QMP, the serial console, the guest agent's
    port and pyqvm-wake's (`Resolved.wake_port`). QEMU inherits one end of each (``theirs``, by fd),
    pyqvm keeps the other (``ours``). Connected before QEMU starts: no client can race
    pyqvm to them, and a port's host side is connected for QEMU's whole life."""

    def __init__(self, resolved: Resolved) -> None:
        wanted = {
            "qmp": True,
            "console": True,
            "agent": resolved.spec.guest_agent,
            "wake": resolved.wake_port,
        }
        self.ours: dict[str, socket.socket] = {}
        self.theirs: dict[str, socket.socket] = {}
        for name in (n for n, on in wanted.items() if on):
            self.ours[name], self.theirs[name] = socket.socketpair()

    def fd(self, name: str) -> int | None:
        """The fd number of QEMU's end of ``name`` (None: the launch has no such channel)."""
        s = self.theirs.get(name)
        return s.fileno() if s is not None else None

    def close_theirs(self) -> None:
        """Once QEMU runs (it holds its own copies), or did not start."""
        for s in self.theirs.values():
            s.close()

    def close(self) -> None:
        self.close_theirs()
        for s in self.ours.values():
            s.close()


def console_listen_path(rundir: Path) -> Path | None:
    """Where `ConsolePort` serves interactive consoles; None when the runtime dir's path is
    too long for a unix socket (107 bytes)."""
    path = rundir / CONSOLE_SOCKET
    return path if len(os.fsencode(path)) < 108 else None


def launch_argv(
    resolved: Resolved,
    rundir: Path,
    *,
    console_log: Path,
    qmp_fd: int,
    console_fd: int | None,
    agent_fd: int | None,
    wake_fd: int | None = None,
    incoming: str | None = None,
    ram: RamFile | None = None,
    networks: Mapping[str, Membership] | None = None,
    ssh_keys: SshKeys | None = None,
    tb_size: int | None = None,
) -> list[str]:
    """The argv for one launch of a resolved spec, given its runtime dir and inherited fds,
    and the private networks its NICs joined (`pyqvm.launch.privnet`), by NIC id.
    ``tb_size``: TCG's translation cache in MiB (`QemuMemory`)."""
    spec = resolved.spec
    members = dict(networks or {})
    missing = [n.id for n in spec.networks if n.mode == "private" and n.id not in members]
    if missing:
        raise ValueError(f"private NICs {missing} have not joined their networks")
    if members:
        nets = tuple(
            dataclasses.replace(n, mac=members[n.id].mac) if n.id in members else n
            for n in spec.networks
        )
        spec = dataclasses.replace(spec, networks=nets)
    if spec.gdb is True and len(os.fsencode(rundir / GDB_SOCKET)) >= 108:
        raise SpecError(
            "gdb",
            f"the runtime dir '{rundir}' is too long for a unix socket path; set "
            'PYQVM_RUNTIME_DIR to a shorter directory or use gdb = "127.0.0.1:PORT"',
        )
    extra = guest_cmdline(members) if resolved.builtin_guest else []
    fw_cfg: dict[str, Path] = {}
    if spec.ssh and resolved.builtin_guest:
        if ssh_keys is None:
            raise ValueError("ssh is on but no keys were made (make_ssh_keys)")
        # The guest's init reads them from fw_cfg sysfs and starts dropbear with them.
        fw_cfg = {SSH_FW_CFG_HOST_KEY: ssh_keys.host_key_dropbear}
        fw_cfg[SSH_FW_CFG_AUTHORIZED] = ssh_keys.client_pub
        extra.append("pyqvm.ssh=1")
    ctx = LaunchContext(
        qemu=resolved.qemu,
        accel=resolved.accel,
        qmp_fd=qmp_fd,
        agent_fd=agent_fd,
        wake_fd=wake_fd,
        console_log=console_log,
        console_fd=console_fd,
        disk_files={
            d.id: DiskFile(overlay=overlay_path(rundir, d.id)) for d in overlay_disks(spec)
        },
        tsc_khz=resolved.facts.tsc_khz,
        incoming=incoming,
        ram=ram,
        share_sockets={s.tag: socket_path(rundir, s) for s in spec.shares},
        gdb_socket=rundir / GDB_SOCKET,
        vde_sockets={i: m.switch for i, m in members.items()},
        append_extra=tuple(extra),
        fw_cfg=fw_cfg,
        # Written by make_seed before QEMU starts.
        seed=rundir / SEED_FILE if spec.cloud_init is not None else None,
        efi_vars=rundir / EFI_VARS if spec.ovmf_vars is not None else None,
        tpm_socket=rundir / swtpm.SOCKET if spec.tpm else None,
        tb_size=tb_size,
    )
    return build_argv(spec, ctx)


def make_ssh_keys(resolved: Resolved, rundir: Path) -> SshKeys | None:
    """A fresh key set in the runtime dir for a built-in guest with ``ssh`` (a guest of
    your own has its keys: ``ssh_key``)."""
    if not (resolved.spec.ssh and resolved.builtin_guest):
        return None
    return make_keys(rundir / SSH_DIR)


def make_efi_vars(resolved: Resolved, rundir: Path) -> Path | None:
    """This launch's UEFI variable store: a private copy of the spec's template."""
    template = resolved.spec.ovmf_vars
    if template is None:
        return None
    dest = rundir / EFI_VARS
    shutil.copyfile(template, dest)
    dest.chmod(0o600)
    return dest


def make_seed(resolved: Resolved, rundir: Path) -> Path | None:
    """The cloud-init seed of this launch in the runtime dir (a fresh instance id), if any."""
    spec = resolved.spec
    if spec.cloud_init is None:
        return None
    key = None
    if spec.ssh_key is not None:
        pub = spec.ssh_key.with_name(spec.ssh_key.name + ".pub")
        key = pub.read_text() if pub.is_file() else None
    hostname = re.sub(r"[^A-Za-z0-9-]", "-", spec.name).strip("-")[:63] or "pyqvm"
    files = seed_files(spec.cloud_init, hostname=hostname, ssh_public_key=key)
    return write_seed(rundir / SEED_FILE, files)


def preview_argv(spec: VMSpec, *, image_cache: Path | None = None) -> list[str]:
    """The argv `Machine.start` would run for ``spec``, with a placeholder runtime dir
    (``$PYQVM_RUNDIR``) and the fd numbers QEMU would inherit (3 to 6)."""
    resolved = resolve(spec, image_cache=image_cache)
    rundir = Path("$PYQVM_RUNDIR")
    return launch_argv(
        resolved,
        rundir,
        console_log=resolved.spec.serial_log or rundir / "console.log",
        qmp_fd=3,
        console_fd=4,
        agent_fd=5 if resolved.spec.guest_agent else None,
        wake_fd=6 if resolved.wake_port else None,
        networks=preview_memberships(resolved.spec),
        ssh_keys=ssh_keys_in(rundir / SSH_DIR),
    )


__all__ = [
    "CONSOLE_SOCKET",
    "FILE_RAM",
    "GDB_SOCKET",
    "QEMU_DEFAULTS",
    "SSH_DIR",
    "Channels",
    "LaunchPlan",
    "QemuMemory",
    "launch_argv",
    "make_efi_vars",
    "make_ssh_keys",
    "preview_argv",
]
