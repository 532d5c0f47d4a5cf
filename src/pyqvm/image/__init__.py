"""The built-in test guest: a Debian kernel, a busybox + qemu-ga initramfs, a data disk.

`build` makes it from Debian packages (cached by its inputs), `find` returns the
newest built one (the launcher only ever needs `find`), `built_images` lists them
and `prune` removes all but the newest of each flavour. Progress is logged at
INFO under ``pyqvm.image``.
"""

from pyqvm.image._build import build
from pyqvm.image._guest import (
    FLAVOURS,
    KERNEL_CMDLINE,
    READY_MARKER,
    GuestImage,
    built_images,
    cache_dir,
    find,
    prune,
)

__all__ = [
    "FLAVOURS",
    "KERNEL_CMDLINE",
    "READY_MARKER",
    "GuestImage",
    "build",
    "built_images",
    "cache_dir",
    "find",
    "prune",
]
