"""Throw-away qcow2 overlays for ephemeral disks: which disks get one, where it lives,
how it is made (``qemu-img``), and how a migration destination takes over the
source's overlay. Also the one upkeep a kept qcow2 disk gets: its leaked clusters
reclaimed after QEMU was killed."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from pyqvm.errors import HostError, LaunchError
from pyqvm.spec import Disk, VMSpec

log = logging.getLogger(__name__)


def overlay_disks(spec: VMSpec) -> list[Disk]:
    """The disks that get a throw-away overlay."""
    return [d for d in spec.disks if d.ephemeral and not d.readonly]


def overlay_path(rundir: Path, disk_id: str) -> Path:
    """Where a disk's overlay lives in a VM's runtime dir."""
    return rundir / f"{disk_id}.qcow2"


def adopt_overlay(existing: Path, overlay: Path) -> None:
    """Use an existing overlay file (another QEMU's, for shared-storage migration) as ours."""
    if not existing.is_file():
        raise LaunchError(f"overlay to take over does not exist: '{existing}'")
    try:
        os.link(existing, overlay)
    except OSError as e:
        log.info("cannot hard-link %s (%s); using a symlink", existing, e)
        overlay.symlink_to(existing)


async def make_overlay(base: Path, fmt: str, overlay: Path) -> Path:
    """A qcow2 overlay over ``base``: the guest writes there, the base is never written."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(base), str(overlay)]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
    except FileNotFoundError:
        raise HostError(
            "qemu-img not found; install it with: apt-get install -y qemu-utils"
        ) from None
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise LaunchError(
            f"could not create an overlay for {base}: {err.decode(errors='replace').strip()}",
            argv=argv,
            exitcode=proc.returncode,
        )
    overlay.chmod(0o600)  # the guest's writes are this user's business only
    return overlay


async def reclaim_leaks(image: Path, timeout: float | None) -> bool:
    """``qemu-img check -r leaks`` on a qcow2 image QEMU no longer holds; True if it is clean.

    A QEMU killed while it allocated clusters (a snapshot save, a write) leaves some
    allocated but unused: harmless (``qemu-img check`` exits 3, "leaked clusters") but
    lost space. This gives them back; it never touches data in use.
    """
    argv = ["qemu-img", "check", "-q", "-r", "leaks", "-f", "qcow2", str(image)]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
    except OSError as e:
        log.warning("cannot reclaim leaked clusters in %s: %s", image, e)
        return False
    try:
        async with asyncio.timeout(timeout):
            _, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        log.warning("qemu-img check -r leaks %s took over %s s; stopped it", image, timeout)
        return False
    if proc.returncode != 0:
        text = err.decode(errors="replace").strip()
        log.warning("qemu-img check -r leaks %s: exit %s: %s", image, proc.returncode, text)
        return False
    return True
