"""What one launch runs or holds beside QEMU, made before it and ended after it.

A `virtiofsd` per virtiofs share (QEMU connects to their sockets), a `swtpm` for a VM with a
TPM, a lease per private-network NIC (`pyqvm.launch.privnet`: QEMU plugs into the network's
switch), the built-in guest's SSH keys (handed over by fw_cfg), and a copy of UEFI's
variables. `Machine` owns one `Companions`; `prepare` runs before QEMU starts,
`qemu_connected` once QMP answers (its NICs are plugged in), `stop` after QEMU is gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pyqvm.host.sshkeys import SshKeys
from pyqvm.launch.plan import make_efi_vars, make_seed, make_ssh_keys
from pyqvm.launch.privnet import Membership, PrivateNetworks
from pyqvm.launch.resolve import Resolved
from pyqvm.launch.swtpm import Swtpm
from pyqvm.launch.virtiofs import Virtiofsds


@dataclass(frozen=True, slots=True)
class Prepared:
    """What `launch_argv` needs from the companions of one launch."""

    networks: dict[str, Membership]
    ssh_keys: SshKeys | None


class Companions:
    def __init__(self) -> None:
        self.virtiofsds = Virtiofsds()
        self.networks = PrivateNetworks()  # its private NICs' leases, while it runs
        self.swtpm = Swtpm()

    async def prepare(self, resolved: Resolved, rundir: Path) -> Prepared:
        await self.virtiofsds.spawn(resolved.spec, rundir)
        await self.swtpm.spawn(resolved.spec, rundir)
        networks = await self.networks.join(resolved.spec)
        make_seed(resolved, rundir)
        make_efi_vars(resolved, rundir)
        return Prepared(networks, make_ssh_keys(resolved, rundir))

    def qemu_connected(self) -> None:
        self.networks.connected()  # the switches may count on QEMU's ports now

    async def end(self) -> None:
        await self.virtiofsds.end()
        await self.swtpm.end()
        self.networks.leave()


__all__ = ["Companions", "Prepared"]
