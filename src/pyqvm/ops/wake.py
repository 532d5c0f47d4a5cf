"""Making a clone of a template its own: the host's clock and a CRNG key of its own.

A clone starts with the template's memory, so with its clock and its kernel's
random generator state. `make_own` fixes both right after the restore, before
any process of the user's runs there: through pyqvm-wake on its port for
pyqvm's own images, through the agent for others (and QEMU's vmgenid device, where
the guest's kernel drives it). `await_stale_seed` is what a template of a guest
without either waits for before it is frozen.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from pyqvm.errors import GuestError, TemplateError
from pyqvm.machine import Machine

log = logging.getLogger(__name__)

#: The guest kernel reseeds its CRNG at the first use after this long without one
#: (Linux 6.1: min(max(1 s, uptime / 2), 60 s)); see `await_stale_seed`.
_RESEED_MAX = 60.0


#: QEMU's vmgenid device as Linux's ACPI bus shows it (its _HID is QEMUVGID).
VMGENID_UEVENT = "/sys/bus/acpi/devices/QEMUVGID:00/uevent"


async def drives_vmgenid(machine: Machine) -> bool:
    """Whether the guest kernel's vmgenid driver (``CONFIG_VMGENID``) has the VM's vmgenid
    device (`VMSpec.has_vmgenid`). A QEMU that loads a state writes its own new ID into
    the guest and notifies it; that driver then reseeds the kernel's CRNG at once."""
    if not machine.resolved_spec.has_vmgenid:
        return False
    try:
        uevent = await machine.agent.read_file(VMGENID_UEVENT)
    except GuestError:  # no such device in the guest's ACPI tables: not a Linux guest, say
        return False
    return b"DRIVER=vmgenid" in uevent.splitlines()


async def await_stale_seed(machine: Machine) -> None:
    """For a guest of the user's own: idle until its CRNG seed is old enough to be
    replaced at its next use.

    A clone starts with the template's CRNG state: until it reseeds, two clones
    would read the same ``/dev/urandom`` bytes. Linux 6.1 reseeds at the first
    use after min(max(1 s, uptime / 2), 60 s) without one (``crng_has_old_seed``).
    Freezing only after that long idle (guest time, which a clone carries on
    from) makes a clone reseed at its first use -- unless something in the
    guest drew random bytes just before the freeze, which nothing here can rule
    out: this is best effort. A guest with pyqvm-wake needs no wait (`make_own`), nor
    one whose kernel drives the VM's vmgenid device (`drives_vmgenid`).
    """
    if await drives_vmgenid(machine):
        log.info("%s: the guest drives vmgenid: a clone reseeds when its ID changes", machine.name)
        return
    uptime = float((await machine.agent.read_file("/proc/uptime")).split()[0])
    wait = min(max(1.0, uptime), _RESEED_MAX) + 0.2
    log.info("%s: letting the guest's random seed age %.1f s before freezing", machine.name, wait)
    # No event says "the seed is old": it is a span of guest time, waited for once per template.
    await asyncio.sleep(wait)


#: How long pyqvm-wake may take to answer (it is one clock_settime
#: and two ioctls, but the clone's first guest cycles run under TCG on a busy host).
WAKE_TIMEOUT = 30.0


async def make_own(machine: Machine) -> None:
    """Set the clone's clock to the host's and give its kernel a CRNG key of its own.

    Writing to ``/dev/urandom`` alone is not enough on Linux 6.1: it feeds the
    input pool, which the CRNG draws from only at its next reseed, up to 60 s
    (of the template's guest time) later; until then two clones read the same
    bytes. ``pyqvm-wake`` of pyqvm's own images (recipe pyqvm-wake.c) does
    both, and reseeds at once (``RNDRESEEDCRNG``), on one line sent to its
    virtio-serial port (`Machine.wake_port`): it already waits there in the
    template, so a clone is woken without a fork or exec in the guest.
    `TemplateError` with its words if it fails. A guest of the user's own gets
    ``guest-set-time``, the bytes written to its ``/dev/urandom``, and relies on
    `await_stale_seed`.
    """
    entropy = os.urandom(64)
    port = machine.wake_port
    if port is None:
        await machine.agent.execute("guest-set-time", {"time": time.time_ns()})
        await machine.agent.write_file("/dev/urandom", entropy)
        return
    try:
        reply = await asyncio.wait_for(
            machine.until_exit(_wake(port, entropy), "waking the clone"), WAKE_TIMEOUT
        )
    except (TimeoutError, OSError) as e:
        reply = f"no answer ({str(e) or 'timed out'})".encode()
    if reply != b"ok\n":
        raise TemplateError(
            f"{machine.name}: setting the clone's clock and random generator failed: "
            f"pyqvm-wake said {reply.decode(errors='replace').strip()!r} (its own messages: "
            "the guest's console, or `journalctl -u pyqvm-wake` in a systemd guest)",
            name=machine.name,
        )


async def _wake(port: socket.socket, entropy: bytes) -> bytes:
    """One request to pyqvm-wake (the host's time, the entropy in hex); its reply line."""
    loop = asyncio.get_running_loop()
    port.setblocking(False)
    await loop.sock_sendall(port, f"{time.time_ns()} {entropy.hex()}\n".encode())
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = await loop.sock_recv(port, 256)
        if not chunk:
            return reply + b"<QEMU closed the port>"
        reply += chunk
    return reply


__all__ = ["VMGENID_UEVENT", "WAKE_TIMEOUT", "await_stale_seed", "drives_vmgenid", "make_own"]
