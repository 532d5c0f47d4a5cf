"""Throw-away qcow2 overlays for ephemeral disks: which disks get one, where it lives,
how it is made (``qemu-img``), and how a migration destination takes over the
source's overlay. Also the one upkeep a kept qcow2 disk gets: its leaked clusters
reclaimed after QEMU was killed."""

from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from pyqvm.deadline import Deadline
from pyqvm.errors import HostError, LaunchError, PyqvmError
from pyqvm.host.packages import install_hint
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


async def _qemu_img(*args: str, timeout: float | None = None) -> tuple[int, str]:
    """Run ``qemu-img ARGS``: (exit status, stderr). `HostError` if it is not installed;
    killed and `TimeoutError` after ``timeout``."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
    except FileNotFoundError:
        raise HostError(
            f"qemu-img not found; install it with: {install_hint('qemu-utils')}"
        ) from None
    try:
        async with asyncio.timeout(timeout):
            _, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, err.decode(errors="replace").strip()


#: Empty overlays made by qemu-img, by what they depend on: the base's path, format and
#: file identity (a base that changed, e.g. grew, has another mtime). Launching
#: clones of one template, or the same image again, copies the bytes (~200 KiB)
#: instead of paying a qemu-img process (~10 ms) each time.
_EMPTY: OrderedDict[tuple[str, str, int, int, int, int], bytes] = OrderedDict()
_EMPTY_KEEP = 16


async def make_overlay(base: Path, fmt: str, overlay: Path) -> Path:
    """A qcow2 overlay over ``base``: the guest writes there, the base is never written."""
    try:
        st = base.stat()
        key = (str(base), fmt, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        key = None  # qemu-img says what is wrong with it
    made = _EMPTY.get(key) if key is not None else None
    if key is not None and made is not None:
        _EMPTY.move_to_end(key)
        try:
            fd = os.open(overlay, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with open(fd, "wb") as f:
                f.write(made)
        except OSError as e:
            overlay.unlink(missing_ok=True)
            raise LaunchError(
                f"could not create an overlay for {base} at '{overlay}': {e.strerror}"
            ) from e
        return overlay
    args = ["create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(base), str(overlay)]
    code, err = await _qemu_img(*args)
    if code != 0:
        raise LaunchError(
            f"could not create an overlay for {base}: {err}",
            argv=["qemu-img", *args],
            exitcode=code,
        )
    overlay.chmod(0o600)  # the guest's writes are this user's business only
    if key is not None:
        _EMPTY[key] = overlay.read_bytes()
        while len(_EMPTY) > _EMPTY_KEEP:
            _EMPTY.popitem(last=False)
    return overlay


async def reclaim_leaks(name: str, disks: Iterable[Disk], deadline: Deadline) -> None:
    """After QEMU was killed (or crashed): ``qemu-img check -r leaks`` on each writable kept
    qcow2 disk of VM ``name``, while ``deadline`` lasts.

    A QEMU killed while it allocated clusters (a snapshot save, a write) leaves some
    allocated but unused: harmless (``qemu-img check`` exits 3, "leaked clusters") but
    lost space. This gives them back; it never touches data in use.
    """
    for d in disks:
        if d.ephemeral or d.readonly or d.format != "qcow2":
            continue
        left = deadline.within(30)
        if left is not None and left <= 0:
            log.warning(
                "%s: no time left to check %s; run: qemu-img check -r leaks %s",
                name,
                d.path,
                d.path,
            )
            continue
        try:
            code, err = await _qemu_img(
                "check", "-q", "-r", "leaks", "-f", "qcow2", str(d.path), timeout=left
            )
        except (PyqvmError, TimeoutError) as e:
            log.warning(
                "%s: cannot reclaim leaked clusters in %s: %s", name, d.path, e or "timeout"
            )
            continue
        if code == 0:
            log.info("%s: %s checked after QEMU was killed (leaks reclaimed)", name, d.path)
        else:
            log.warning("%s: qemu-img check -r leaks %s: exit %s: %s", name, d.path, code, err)
