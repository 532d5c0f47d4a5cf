"""The guest's screen (``display = "vga"`` or ``"virtio-gpu"``), through QMP ``screendump``.

`screenshot` returns a PNG as QEMU writes it. Waiting for the screen to change or to settle
compares QEMU's raw frames (PPM) and needs nothing else. Comparing with a reference image
(`wait_for_screen`, as openQA's needles do, with a region and a threshold) needs Pillow, and
reading text (`wait_for_text`, OCR) also Debian's ``tesseract-ocr``: both optional, each
asked for by name when missing (``pip install 'pyqvm[screen]'``).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyqvm.deadline import Deadline
from pyqvm.errors import HostError, PyqvmTimeoutError, SpecError, VMStateError
from pyqvm.machine import Machine
from pyqvm.state import VMState

if TYPE_CHECKING:
    from PIL.Image import Image

#: A region of the screen: left, top, width, height (pixels).
Region = tuple[int, int, int, int]
#: Seconds between two looks at the screen while waiting.
POLL = 0.25
_SHOT = "screen.{}"


def _check(vm: Machine) -> None:
    vm.require(VMState.RUNNING, VMState.PAUSED, what="looking at the screen")
    if vm.spec.display == "none":
        raise VMStateError(
            f'VM {vm.name!r} has no display; set display = "vga" (or "virtio-gpu") in its spec'
        )


async def _dump(vm: Machine, fmt: str) -> bytes:
    path = vm.runtime_file(_SHOT.format(fmt))
    try:
        await vm.execute("screendump", {"filename": str(path), "format": fmt})
        return path.read_bytes()
    finally:
        path.unlink(missing_ok=True)


async def screenshot(vm: Machine, path: Path | str | None = None) -> bytes:
    """The screen as PNG bytes (also written to ``path`` if given)."""
    _check(vm)
    png = await _dump(vm, "png")
    vm.last_screenshot = png
    if path is not None:
        Path(path).write_bytes(png)
    return png


async def _frame(vm: Machine) -> bytes:
    """A digest of the screen's pixels (PPM: raw, no compression to vary)."""
    return hashlib.blake2b(await _dump(vm, "ppm"), digest_size=16).digest()


async def wait_screen_change(vm: Machine, *, timeout: float = 60.0) -> bytes:
    """Wait until the screen differs from what it shows now; its PNG then."""
    _check(vm)
    deadline = Deadline(timeout)
    first = await _frame(vm)
    while await _frame(vm) == first:
        if deadline.expired:
            raise PyqvmTimeoutError(f"VM {vm.name!r}: the screen did not change in {timeout:g} s")
        await asyncio.sleep(deadline.within(POLL) or 0.0)
    return await screenshot(vm)


async def wait_screen_stable(vm: Machine, *, seconds: float = 1.0, timeout: float = 60.0) -> bytes:
    """Wait until the screen has not changed for ``seconds``; its PNG then."""
    _check(vm)
    deadline = Deadline(timeout)
    loop = asyncio.get_running_loop()
    last, since = await _frame(vm), loop.time()
    while loop.time() - since < seconds:
        if deadline.expired:
            raise PyqvmTimeoutError(f"VM {vm.name!r}: the screen kept changing for {timeout:g} s")
        await asyncio.sleep(deadline.within(POLL) or 0.0)
        now = await _frame(vm)
        if now != last:
            last, since = now, loop.time()
    return await screenshot(vm)


def _pil() -> Any:
    try:
        from PIL import Image, ImageChops, ImageStat
    except ImportError:
        raise HostError(
            "comparing screens needs Pillow: pip install 'pyqvm[screen]' (or pillow)"
        ) from None
    return Image, ImageChops, ImageStat


def _crop(image: Image, region: Region | None, field: str) -> Image:
    if region is None:
        return image
    left, top, width, height = region
    if width <= 0 or height <= 0 or left < 0 or top < 0:
        raise SpecError(field, f"{region!r}: (left, top, width, height), all positive")
    if left + width > image.width or top + height > image.height:
        raise SpecError(field, f"{region!r} reaches past the screen ({image.width}x{image.height})")
    return image.crop((left, top, left + width, top + height))


def difference(screen: bytes, reference: Path | bytes, region: Region | None = None) -> float:
    """How far ``screen`` (PNG) is from ``reference`` (a PNG file or bytes, as large as
    ``region``, or as the screen): 0.0 the same, 1.0 black against white."""
    pil, chops, stat = _pil()
    shot = _crop(pil.open(io.BytesIO(screen)).convert("RGB"), region, "region")
    ref_bytes = reference if isinstance(reference, bytes) else Path(reference).read_bytes()
    ref = pil.open(io.BytesIO(ref_bytes)).convert("RGB")
    if ref.size != shot.size:
        raise SpecError(
            "reference",
            f"the reference is {ref.width}x{ref.height}, the "
            f"{'region' if region else 'screen'} {shot.width}x{shot.height}",
        )
    means: Sequence[float] = stat.Stat(chops.difference(shot, ref)).mean
    return sum(means) / (len(means) * 255.0)


async def wait_for_screen(
    vm: Machine,
    reference: Path | str | bytes,
    *,
    region: Region | None = None,
    threshold: float = 0.02,
    timeout: float = 60.0,
) -> float:
    """Wait until the screen (or ``region`` of it) matches ``reference`` within
    ``threshold`` (mean difference, 0..1); the difference then."""
    _check(vm)
    _pil()
    ref = reference if isinstance(reference, bytes) else Path(reference).read_bytes()
    deadline = Deadline(timeout)
    while True:
        diff = difference(await screenshot(vm), ref, region)
        if diff <= threshold:
            return diff
        if deadline.expired:
            raise PyqvmTimeoutError(
                f"VM {vm.name!r}: the screen did not match the reference in {timeout:g} s "
                f"(difference {diff:.3f}, threshold {threshold:g})"
            )
        await asyncio.sleep(deadline.within(POLL) or 0.0)


def ocr(png: bytes, region: Region | None = None) -> str:
    """The text on a screenshot, read by Tesseract (Debian's ``tesseract-ocr``)."""
    pil, _, _ = _pil()
    tesseract = shutil.which("tesseract")
    if tesseract is None:
        raise HostError("reading the screen needs Tesseract: apt-get install tesseract-ocr")
    image = _crop(pil.open(io.BytesIO(png)).convert("L"), region, "region")
    # A text console's 8x16 glyphs are small for Tesseract: twice as large reads better.
    image = image.resize((image.width * 2, image.height * 2), pil.Resampling.LANCZOS)
    with tempfile.TemporaryDirectory(prefix="pyqvm-ocr-") as d:
        path = Path(d) / "screen.png"
        image.save(path)
        proc = subprocess.run(
            [tesseract, str(path), "stdout", "--psm", "6"],
            capture_output=True,
            text=True,
            check=False,
        )
    if proc.returncode != 0:
        raise HostError(f"tesseract failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


async def wait_for_text(
    vm: Machine, pattern: str, *, region: Region | None = None, timeout: float = 60.0
) -> str:
    """Wait until OCR finds ``pattern`` (a regular expression) on the screen; what it
    read then."""
    _check(vm)
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise SpecError("pattern", f"{pattern!r} is not a valid regular expression: {e}") from None
    deadline = Deadline(timeout)
    text = ""
    while True:
        png = await screenshot(vm)
        text = await asyncio.to_thread(ocr, png, region)
        if rx.search(text):
            return text
        if deadline.expired:
            raise PyqvmTimeoutError(
                f"VM {vm.name!r}: {pattern!r} not on the screen in {timeout:g} s; it read:\n"
                + text.strip()[-1000:]
            )
        await asyncio.sleep(deadline.within(POLL) or 0.0)


async def vnc(vm: Machine, address: str | None = None) -> str:
    """Let a VNC viewer in: on a unix socket in the runtime dir, or on TCP ``HOST:PORT``
    when asked. Returns where (``unix:PATH`` or ``HOST:PORT``)."""
    _check(vm)
    if address is None:
        path = vm.runtime_file("vnc.sock")
        where: dict[str, object] = {"type": "unix", "path": str(path)}
        shown = f"unix:{path}"
    else:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise SpecError("address", f"{address!r}: give HOST:PORT, e.g. 127.0.0.1:5901")
        where = {"type": "inet", "host": host, "port": port}
        shown = address
    await vm.execute("display-update", {"type": "vnc", "addresses": [where]})
    return shown


__all__ = [
    "Region",
    "difference",
    "ocr",
    "screenshot",
    "vnc",
    "wait_for_screen",
    "wait_for_text",
    "wait_screen_change",
    "wait_screen_stable",
]
