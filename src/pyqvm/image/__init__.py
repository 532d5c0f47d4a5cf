"""The built-in test guest: a Debian kernel, a busybox + qemu-ga initramfs, a data disk.

`build` makes it from Debian packages (cached by its inputs), `find` returns the
newest built one (the launcher only ever needs `find`), `ensure` finds or builds
it (what the faces call before a launch, as ``docker run`` pulls), `built_images`
lists them and `prune` removes all but the newest of each flavour and arch.
Progress is logged at INFO under ``pyqvm.image``.

Submodules: `guest` (the built image as the launcher sees it; free of build
machinery), `builder` (the build steps), `archive` (the Debian archive client
the packages come from), `libraries` (a program's shared libraries, read from
its ELF headers), `tools` (the host tools the builder runs), `modules` (kernel
module selection) and `cpio` (the initramfs archive format).
"""

from pyqvm.image.builder import build, ensure
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
    "ensure",
    "find",
    "image_of_kernel",
    "prune",
]
