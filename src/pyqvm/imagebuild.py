"""Building images with pyqvm itself: what every face calls to build or find an image.

The busybox images are built on the host alone (`pyqvm.image.build`). A
distribution image (the ``debian`` flavour) is finished in a guest: its second
stage runs in a helper VM of the built-in ``default`` image of the same
architecture, with the new system's disk attached (`second_stage`), so it is
built the same way on any host and for any arch QEMU emulates. Booting a VM is
this floor's work, not the image builder's, so the builder takes the helper as
a function and this module hands it over.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

from pyqvm import image
from pyqvm.errors import ImageError
from pyqvm.faces.derived_vm import VM
from pyqvm.image.builder import BytesProgress
from pyqvm.spec import Arch, Disk, VMSpec
from pyqvm.spec.arches import ArchInfo

log = logging.getLogger(__name__)

#: A second stage under TCG takes minutes (dpkg configures ~200 packages); bounded all the same.
SECOND_STAGE_TIMEOUT = 3600.0
HELPER_MEMORY = "2G"


def _run_helper(disks: Sequence[Path], arch: ArchInfo, command: str) -> tuple[int, str, str]:
    spec = VMSpec(
        name=f"pyqvm-second-stage-{arch.debian}",
        image="default",
        arch=cast(Arch, arch.name),
        memory=HELPER_MEMORY,
        smp=2,
        disks=tuple(Disk(path=d, format="raw", ephemeral=False) for d in disks),
    )
    with VM(spec) as vm:
        result = vm.run(["sh", "-c", command], timeout=SECOND_STAGE_TIMEOUT)
    return result.exitcode, result.stdout_text, result.stderr_text


def second_stage(disks: Sequence[Path], arch: ArchInfo, command: str) -> None:
    """Run ``command`` as root in a helper guest of ``arch`` with ``disks`` (raw) attached.

    Raises:
        ImageError: the command failed; the message has the end of its output.
    """
    image.ensure("default", arch=arch.name)  # the helper itself, built first if need be
    log.info("second stage in a helper guest for %s (dpkg configures everything; minutes "
             "under TCG)", arch.name)  # fmt: skip
    # A VM of its own thread: the caller may be inside a running event loop.
    with ThreadPoolExecutor(1, thread_name_prefix="pyqvm-second-stage") as pool:
        code, out, err = pool.submit(_run_helper, disks, arch, command).result()
    if code != 0:
        tail = "\n".join((out + err).strip().splitlines()[-25:])
        raise ImageError(f"the second stage failed in the {arch.name} helper guest "
                         f"(exit {code}):\n{tail}")  # fmt: skip


def build(
    flavour: str = "default",
    *,
    force: bool = False,
    cache: Path | None = None,
    arch: str = "x86_64",
    progress: BytesProgress | None = None,
) -> image.GuestImage:
    """`pyqvm.image.build`, with this module's helper guest for a distribution's second stage."""
    return image.build(
        flavour, force=force, cache=cache, arch=arch, progress=progress, second_stage=second_stage
    )


def ensure(
    flavour: str = "default",
    *,
    arch: str = "x86_64",
    cache: Path | None = None,
    progress: BytesProgress | None = None,
) -> image.GuestImage:
    """`pyqvm.image.ensure`, with this module's helper guest for a distribution's second stage."""
    return image.ensure(
        flavour, arch=arch, cache=cache, progress=progress, second_stage=second_stage
    )


__all__ = ["SECOND_STAGE_TIMEOUT", "build", "ensure", "second_stage"]
