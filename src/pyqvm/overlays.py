"""Throw-away qcow2 overlays for ephemeral disks: which disks get one, where it lives,
how it is made (``qemu-img``), and how a migration destination takes over the
source's overlay."""

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
