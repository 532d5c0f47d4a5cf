"""A saved VM that carries everything it needs: restored on another machine too.

A plain `save` writes the state and each disk's overlay, which points at its backing
files (the image, a template's frozen disks) by absolute path on this host. A portable
save (``save(..., portable=True)``, what ``pytest --pyqvm-keep-failed`` keeps) also makes
each disk one standalone qcow2 (``qemu-img convert`` through the chain), copies the
kernel, initrd and every other file the spec names into the directory, and writes
``pyqvm-portable.json``: the spec with those paths relative to the directory, and the
versions of pyqvm and QEMU that wrote it. A restore reads the spec from there, so the
directory can be moved, uploaded by a CI job and restored elsewhere, and refuses a QEMU of
another version before starting it (a device state loads only into the QEMU that wrote
it, and a mismatch there is a cryptic "Unknown savevm section").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from pyqvm import image
from pyqvm.errors import MigrationError
from pyqvm.host.facts import pyqvm_version, qemu_version_line
from pyqvm.image.guest import MANIFEST
from pyqvm.machine import Machine
from pyqvm.runtime.children import ChildProcess
from pyqvm.spec import VMSpec
from pyqvm.spec.io import spec_from_dict, spec_to_dict

log = logging.getLogger(__name__)

PORTABLE = "pyqvm-portable.json"
FORMAT = 1
FILES = "files"
IMAGE = "image"


def qemu_version_of(binary: str | Path) -> str:
    """`qemu_version_line`, or `MigrationError` when ``binary`` does not say it."""
    line = qemu_version_line(binary)
    if line is None:
        raise MigrationError(f"cannot ask '{binary}' for its version (--version)")
    return line


async def make_portable(vm: Machine, out: Path, disks: dict[str, Path]) -> None:
    """After `save` wrote ``out`` (the VM is stopped or paused, its disks flushed): make
    every disk of ``disks`` (id -> the overlay saved there) standalone, copy the spec's
    files in and write `PORTABLE`."""
    for saved in disks.values():
        await _flatten(vm, saved)
    spec = vm.resolved_spec
    record = {
        "format": FORMAT,
        "pyqvm": pyqvm_version(),
        "qemu": qemu_version_of(vm.argv[0]),
        "spec": _relative_spec(spec, out, set(disks)),
    }
    (out / PORTABLE).write_text(json.dumps(record, indent=2) + "\n")
    log.info("%s: the saved state in %s is portable", vm.name, out)


async def _flatten(vm: Machine, overlay: Path) -> None:
    """Rewrite ``overlay`` as one qcow2 holding what its whole backing chain shows."""
    flat = overlay.with_suffix(".flat")
    errors = overlay.with_suffix(".err")
    qemu_img = Path(vm.argv[0]).with_name("qemu-img")
    tool = str(qemu_img) if qemu_img.exists() else shutil.which("qemu-img") or "qemu-img"
    child = ChildProcess()
    await child.start([tool, "convert", "-O", "qcow2", str(overlay), str(flat)], stderr_path=errors)
    code = await child.wait()
    if code != 0:
        message = child.stderr_text().strip()
        flat.unlink(missing_ok=True)
        raise MigrationError(f"{vm.name}: making '{overlay}' standalone failed: {message}")
    errors.unlink(missing_ok=True)
    flat.replace(overlay)


def _relative_spec(spec: VMSpec, out: Path, saved_disks: set[str]) -> dict[str, Any]:
    """``spec`` as data, with every file it names copied under ``out`` and named relative
    to it; the saved disks are their standalone copies (``ID.qcow2``)."""
    copied: dict[Path, str] = {}
    if spec.kernel is not None and (img := image.image_of_kernel(spec.kernel.kernel)):
        # A built image goes whole (its manifest too): a restore knows it for pyqvm's
        # guest then, and gives it the same devices (pyqvm-wake's port).
        (out / IMAGE).mkdir()
        for path in (img.directory / MANIFEST, img.kernel, img.bzimage, img.initrd, img.disk):
            if path not in copied:
                _link_or_copy(path, out / IMAGE / path.name)
                copied[path] = f"{IMAGE}/{path.name}"

    def carry(path: Path) -> str:
        if path not in copied:
            rel = f"{FILES}/{len(copied)}-{path.name}"
            (out / FILES).mkdir(exist_ok=True)
            _link_or_copy(path, out / rel)
            copied[path] = rel
        return copied[path]

    # Patched as data: a spec part made absolute paths of relative ones at construction.
    data = spec_to_dict(dataclasses.replace(spec, serial_log=None))
    if spec.kernel is not None:
        data["kernel"]["kernel"] = carry(spec.kernel.kernel)
        if spec.kernel.initrd is not None:
            data["kernel"]["initrd"] = carry(spec.kernel.initrd)
    for disk, entry in zip(spec.disks, data["disks"], strict=True):
        entry["path"] = f"{disk.id}.qcow2" if disk.id in saved_disks else carry(disk.path)
    for field in ("ovmf_code", "ovmf_vars", "ssh_key"):
        if (value := getattr(spec, field)) is not None:
            data[field] = carry(value)
    data["cdroms"] = [carry(c) for c in spec.cdroms]
    return data


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where it can be (the files are never written), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _record(directory: Path) -> dict[str, Any] | None:
    try:
        record: dict[str, Any] = json.loads((directory / PORTABLE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise MigrationError(f"'{directory / PORTABLE}' is unreadable: {e}") from None
    return record


def portable_spec(directory: Path, name: str) -> VMSpec | None:
    """The spec a portable save in ``directory`` holds (its files found there), named
    ``name``; None if the save is not portable. `MigrationError` if it was written by
    another QEMU than this host's (checked when the VM launches: `check_portable`)."""
    record = _record(directory)
    if record is None:
        return None
    if record.get("format") != FORMAT:
        raise MigrationError(
            f"'{directory}' is a portable save of format {record.get('format')!r}, this "
            f"pyqvm reads format {FORMAT}: restore it with pyqvm {record.get('pyqvm')}"
        )
    data = {**record["spec"], "name": name}
    return spec_from_dict(data, base_dir=directory.resolve())


def check_portable(directory: Path, binary: str | Path) -> None:
    """`MigrationError` naming both versions if ``binary`` is not the QEMU that wrote the
    portable save in ``directory`` (a device state loads only into its own QEMU)."""
    record = _record(directory)
    if record is None:
        return
    here = qemu_version_of(binary)
    if record.get("qemu") != here:
        raise MigrationError(
            f"'{directory}' was saved by {record.get('qemu')!r} and this host's QEMU is "
            f"{here!r} ({binary}): a saved state loads only into the QEMU version that wrote "
            f"it; restore it on a host with that version (pyqvm {record.get('pyqvm')})"
        )


__all__ = ["PORTABLE", "check_portable", "make_portable", "portable_spec", "qemu_version_of"]
