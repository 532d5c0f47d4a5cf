"""A NIC of the spec (`Network`) and its port forwards: what the guest's network is.

How it is wired up at launch is `pyqvm.argv.devices`' (QEMU's netdevs) and
`pyqvm.privnet`'s (the switch of a private network).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

from pyqvm.errors import SpecError
from pyqvm.fields import (
    MAC_RE,
    PRIVATE_NET_RE,
    check_id,
    choice,
    private_address,
    set_field,
    show,
    slirp_address,
)

NetMode = Literal["none", "user", "tap", "private"]
NicModel = Literal["auto", "virtio", "e1000", "e1000e"]


@dataclass(frozen=True, slots=True)
class PortForward:
    """A host port forwarded into the guest (user-mode networking)."""

    host_port: int
    guest_port: int
    protocol: Literal["tcp", "udp"] = "tcp"
    host_address: str = "127.0.0.1"

    def __post_init__(self) -> None:
        for name in ("host_port", "guest_port"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
                raise SpecError(f"forward.{name}", f"{show(v)} is not a port number (1-65535)")
        choice(self.protocol, ("tcp", "udp"), "forward.protocol")
        if not isinstance(self.host_address, str) or not slirp_address(self.host_address):
            raise SpecError("forward.host_address", f"{self.host_address!r} is not an address")


@dataclass(frozen=True, slots=True)
class Network:
    """One NIC: ``user`` is QEMU's user-mode (slirp) network, ``tap`` an existing tap device,
    ``private`` the L2 segment ``name`` that every VM naming it on this host shares
    (`pyqvm.privnet`), at ``address`` (CIDR) or one pyqvm leases in the network's subnet."""

    mode: NetMode = "user"
    model: NicModel = "auto"
    forwards: tuple[PortForward, ...] = ()
    tap: str | None = None
    mac: str | None = None
    id: str = ""
    name: str | None = None
    address: str | None = None

    def __post_init__(self) -> None:
        choice(self.mode, get_args(NetMode), "network.mode")
        choice(self.model, get_args(NicModel), "network.model")
        set_field(self, "forwards", tuple(self.forwards))
        if self.mode == "tap":
            if not isinstance(self.tap, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", self.tap):
                raise SpecError("network.tap", f"{self.tap!r} is not a tap interface name")
        elif self.tap is not None:
            raise SpecError("network.tap", 'only valid with mode = "tap"')
        if self.forwards and self.mode != "user":
            raise SpecError("network.forwards", 'port forwards need mode = "user"')
        if self.mode == "private":
            if not isinstance(self.name, str) or not PRIVATE_NET_RE.fullmatch(self.name):
                raise SpecError(
                    "network.name",
                    f"{show(self.name)} is not a private network name: use 1-32 letters, "
                    "digits, '-', '_' or '.', starting with a letter or digit (e.g. \"lab\")",
                )
            if self.address is not None:
                private_address(self.name, self.address)
        elif self.name is not None or self.address is not None:
            raise SpecError(
                "network.name" if self.name is not None else "network.address",
                'only valid with mode = "private"',
            )
        if self.mac is not None:
            if not isinstance(self.mac, str) or not MAC_RE.match(self.mac):
                raise SpecError(
                    "network.mac", f"{show(self.mac)} is not a MAC address like 52:54:00:12:34:56"
                )
            first = int(self.mac[:2], 16)
            if self.mac.replace(":", "").strip("0") == "" or first & 1:
                # QEMU silently replaces the all-zero MAC; a multicast one the guest refuses.
                raise SpecError(
                    "network.mac",
                    f"{self.mac!r} is not a unicast address a NIC can have (not all zero, "
                    "first byte even); use e.g. 52:54:00:12:34:56",
                )
        if self.id != "":
            check_id(self.id, "network.id")


__all__ = ["NetMode", "Network", "NicModel", "PortForward"]
