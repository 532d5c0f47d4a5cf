"""The built guest image as the launcher sees it: `GuestImage`, `find`, the cache layout.

Kept free of build machinery, since the launcher imports it at run time.

Cache layout (under `cache_dir`)::

    archive/                   Debian's release files and indices (pyqvm.image.archive)
    downloads/sha256/<hex>     .deb files by hash, shared by flavours and builds
    images/<flavour>-<key>/    one built image; <key> hashes every build input
        vmlinux  vmlinuz  initrd.img  disk.qcow2
        manifest.json          written last: an image without it does not exist
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pyqvm.errors import ImageError, SpecError

log = logging.getLogger(__name__)

FLAVOURS: tuple[str, ...] = ("default", "full", "debian")
#: Flavours that are a whole distribution (systemd, packages), not pyqvm's busybox init.
DISTRO_FLAVOURS: tuple[str, ...] = ("debian",)

# Debian's kernel meta package per flavour (of the guest's Debian architecture):
# "default" boots fastest (virtio only), "full" also drives emulated hardware
# (e1000/e1000e, AHCI, PIIX IDE) and has 9p.
KERNEL_PACKAGES = {"default": "linux-image-cloud-{debian}", "full": "linux-image-{debian}"}

READY_MARKER = "pyqvm-guest-ready"

# Kernel command line for the built-in guest on pc/q35 (microvm also wants
# tsc_early_khz=<host kHz>). Everything here trims boot time under TCG.
KERNEL_CMDLINE = (
    "console=ttyS0 mitigations=off tsc=reliable no_timer_check i8042.noaux i8042.nokbd "
    "noreplace-smp cryptomgr.notests panic=-1 quiet"
)
# The same per guest arch; an image records its own in its manifest.
KERNEL_CMDLINES = {
    "x86_64": KERNEL_CMDLINE,
    "aarch64": "console=ttyAMA0 mitigations=off cryptomgr.notests panic=-1 quiet",
}

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


@dataclass(frozen=True, slots=True)
class GuestImage:
    """A built guest: kernel, initramfs and base disk, ready to boot.

    ``kernel`` is the PVH-capable ELF vmlinux when it could be extracted, else
    the bzImage. ``disk`` is a base qcow2 (ext4 labelled ``pyqvm-data``) that
    must only be used as the backing file of an overlay.
    """

    flavour: str
    directory: Path
    kernel: Path
    bzimage: Path
    initrd: Path
    disk: Path
    kernel_version: str
    ready_marker: str
    arch: str = "x86_64"
    cmdline: str = KERNEL_CMDLINE
    kind: str = "busybox"  # or "distro" (DISTRO_FLAVOURS): no pyqvm init, no ready marker
    # A distro's UEFI boot disk (GPT, ESP with systemd-boot): boots `disk` under OVMF.
    boot_disk: Path | None = None
    # It runs pyqvm-wake on the wake port (a clone is made its own through it).
    wake_port: bool = False


def cache_dir() -> Path:
    """``$PYQVM_CACHE_DIR``, else ``$XDG_CACHE_HOME/pyqvm``, else ``~/.cache/pyqvm``."""
    if explicit := os.environ.get("PYQVM_CACHE_DIR"):
        return Path(explicit)
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg) / "pyqvm"
    return Path.home() / ".cache" / "pyqvm"


def check_flavour(flavour: str) -> None:
    """Raise `SpecError` (field ``flavour``) unless ``flavour`` is one of `FLAVOURS`."""
    if flavour not in FLAVOURS:
        raise SpecError("flavour", f"unknown guest flavour {flavour!r}; use one of {FLAVOURS}")


def cache_key(inputs: Mapping[str, str]) -> str:
    """Stable short hash of the build inputs (order does not matter)."""
    blob = json.dumps(dict(sorted(inputs.items())), separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_image(directory: Path) -> GuestImage | None:
    """The image in ``directory``, or None when it is incomplete or not ours."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            return None
        image = GuestImage(
            flavour=str(manifest["flavour"]),
            directory=directory,
            kernel=directory / manifest["kernel"],
            bzimage=directory / manifest["bzimage"],
            initrd=directory / manifest["initrd"],
            disk=directory / manifest["disk"],
            kernel_version=str(manifest["kernel_version"]),
            ready_marker=str(manifest["ready_marker"]),
            arch=str(manifest.get("arch", "x86_64")),
            cmdline=str(manifest.get("cmdline", KERNEL_CMDLINE)),
            kind=str(manifest.get("kind", "busybox")),
            boot_disk=directory / manifest["boot_disk"] if "boot_disk" in manifest else None,
            wake_port=manifest.get("wake_port") is True,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    files = (image.kernel, image.bzimage, image.initrd, image.disk)
    return image if all(p.is_file() for p in files) else None


def image_of_kernel(kernel: Path) -> GuestImage | None:
    """The built image whose kernel ``kernel`` is (a spec made concrete from an image's
    names its files), or None."""
    image = load_image(kernel.parent)
    return image if image is not None and kernel in (image.kernel, image.bzimage) else None


def built_images(
    flavour: str | None = None, *, cache: Path | None = None, arch: str | None = None
) -> list[GuestImage]:
    """The complete built images (of ``flavour`` and ``arch``, or of all), newest first."""
    if flavour is not None:
        check_flavour(flavour)
    root = (cache or cache_dir()) / "images"
    found: list[tuple[float, GuestImage]] = []
    for directory in root.glob(f"{flavour or '*'}-*"):
        image = load_image(directory)
        if image is not None and flavour in (None, image.flavour) and arch in (None, image.arch):
            found.append(((directory / MANIFEST).stat().st_mtime, image))
    return [image for _, image in sorted(found, key=lambda item: item[0], reverse=True)]


def find(
    flavour: str = "default", *, cache: Path | None = None, arch: str = "x86_64"
) -> GuestImage:
    """The newest built image of ``flavour`` for guests of ``arch``.

    Raises:
        ImageError: none has been built (the message says how to build one).
    """
    found = built_images(flavour, cache=cache, arch=arch)
    if not found:
        images = (cache or cache_dir()) / "images"
        how = f"--flavour {flavour}" + ("" if arch == "x86_64" else f" --arch {arch}")
        raise ImageError(
            f"no built-in guest image of flavour {flavour!r} for {arch} in {images}; "
            f"run `pyqvm image build {how}`"
        )
    return found[0]


def prune(*, cache: Path | None = None, dry_run: bool = False) -> list[GuestImage]:
    """Remove every built image but the newest of each flavour and arch; returns what went.

    A state saved from a VM on an older image names that image's disk as its base
    (`pyqvm.ops.migration.save`): restoring it needs the image, so prune after.
    """
    gone: list[GuestImage] = []
    newest: set[tuple[str, str]] = set()
    for image in built_images(cache=cache):
        if (image.flavour, image.arch) not in newest:
            newest.add((image.flavour, image.arch))
            continue
        if not dry_run:
            log.info("removing %s image %s", image.flavour, image.directory)
            shutil.rmtree(image.directory)
        gone.append(image)
    return gone
