"""A missing built-in image is built before the first launch that needs it, with the
download's progress on a terminal (one line, rewritten) and plain log lines elsewhere."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from pyqvm.image.builder import BytesProgress
    from pyqvm.spec import VMSpec


def terminal_progress(stream: TextIO) -> BytesProgress | None:
    """One line on ``stream`` rewritten as bytes arrive, ended when all have; None when
    ``stream`` is not a terminal (pipes and CI get the build's few log lines only)."""
    if not stream.isatty():
        return None
    shown = [-1]

    def show(done: int, total: int) -> None:
        step = done * 200 // max(total, 1)  # redraw at each half percent, not each chunk
        if step == shown[0] and done < total:
            return
        shown[0] = step
        end = "\n" if done >= total else ""
        stream.write(f"\rpyqvm: downloaded {done / 2**20:.1f} of {total / 2**20:.1f} MiB{end}")
        stream.flush()

    return show


def ensure_image(spec: VMSpec) -> None:
    """Build ``spec``'s built-in image if none is built yet (`pyqvm.image.ensure`)."""
    if spec.image is None:
        return
    from pyqvm import imagebuild

    imagebuild.ensure(spec.image, arch=spec.arch, progress=terminal_progress(sys.stderr))


__all__ = ["ensure_image", "terminal_progress"]
