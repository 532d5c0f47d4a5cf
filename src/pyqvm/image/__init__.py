"""The built-in test guest: a Debian kernel, a busybox + qemu-ga initramfs, a data disk.

`build` makes it from Debian packages (cached by its inputs), `find` returns the
newest built one (the launcher only ever needs `find`), `built_images` lists them
and `prune` removes all but the newest of each flavour. Progress is logged at
INFO under ``pyqvm.image``.

Submodules: `guest` (the built image as the launcher sees it; free of build
machinery), `builder` (the build steps), `tools` (the host tools and apt calls
the builder runs), `modules` (kernel module selection) and `cpio` (the
initramfs archive format).
"""

from pyqvm.image.builder import build
from pyqvm.image.guest import (
    FLAVOURS,
    KERNEL_CMDLINE,
    READY_MARKER,
    GuestImage,
    built_images,
    cache_dir,
    find,
    image_of_kernel,
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
    "image_of_kernel",
    "prune",
]
