"""Facts about a guest kernel file: ELF vmlinux or x86 bzImage.

`inspect_kernel` tells the launcher what it may do with a kernel (boot it via
PVH, which needs the Xen ``PHYS32_ENTRY`` ELF note; or boot it as a bzImage),
and `extract_vmlinux` turns a bzImage into the PVH-capable ELF it wraps.
"""

from __future__ import annotations

import bz2
import gzip
import io
import logging
import lzma
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from pyqvm.errors import HostError, SpecError
from pyqvm.host.packages import install_hint

log = logging.getLogger(__name__)

# ELF e_machine (as pyelftools names it) -> QEMU's architecture name.
_QEMU_ARCH = {
    "EM_X86_64": "x86_64",
    "EM_386": "i386",
    "EM_AARCH64": "aarch64",
    "EM_ARM": "arm",
    "EM_RISCV": "riscv",  # width is fixed up from the ELF class below
    "EM_PPC64": "ppc64",
    "EM_PPC": "ppc",
    "EM_S390": "s390x",
    "EM_MIPS": "mips",
    "EM_LOONGARCH": "loongarch64",
}

XEN_ELFNOTE_PHYS32_ENTRY = 18

# bzImage setup header offsets (Documentation/arch/x86/boot.rst).
_SETUP_SECTS = 0x1F1
_HDRS_MAGIC = 0x202
_VERSION = 0x206
_PAYLOAD_OFFSET = 0x248
_PAYLOAD_LENGTH = 0x24C
_HEADER_END = 0x250

# Payload magics, longest first so xz wins over a shorter prefix.
_PAYLOAD_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x89LZO", "lzo"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x1f\x8b", "gzip"),
    (b"\x1f\x9e", "gzip"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00", "lzma"),
)

_NOT_A_KERNEL = (
    "is neither an ELF vmlinux, a bzImage nor an arm64 Image; give a kernel image such as "
    "/boot/vmlinuz-*"
)
# arm64's Image header (Documentation/arch/arm64/booting.rst): "ARM\x64" at offset 56.
_ARM64_MAGIC = (56, b"ARM\x64")


@dataclass(frozen=True, slots=True)
class KernelInfo:
    """What a kernel file is and how it can be booted.

    ``pvh_entry`` is set only for ELF files carrying the Xen PVH entry note; the
    bzImage fields are set only for bzImages (``compression`` is ``None`` when
    the payload magic is unknown).
    """

    path: Path
    format: Literal["elf", "bzimage", "image"]  # image: arm64's (possibly gzipped)
    arch: str
    pvh_entry: int | None = None
    protocol_version: tuple[int, int] | None = None
    payload_offset: int | None = None
    payload_length: int | None = None
    compression: str | None = None

    @property
    def pvh_capable(self) -> bool:
        return self.pvh_entry is not None


def inspect_kernel(path: Path, field: str = "kernel") -> KernelInfo:
    """Identify ``path`` as an ELF vmlinux or a bzImage.

    Raises:
        SpecError: the file is missing, unreadable, or not a kernel (``field``
            names the spec field it came from).
    """
    try:
        with path.open("rb") as f:
            head = f.read(_HEADER_END)
            if head[:4] == b"\x7fELF":
                f.seek(0)
                return _inspect_elf(path, f, field)
    except FileNotFoundError:
        raise SpecError(field, f"no such file '{path}'") from None
    except IsADirectoryError:
        raise SpecError(field, f"'{path}' is a directory, not a kernel image") from None
    except OSError as e:
        raise SpecError(field, f"cannot read '{path}': {e.strerror}") from None
    if len(head) >= _HEADER_END and head[_HDRS_MAGIC : _HDRS_MAGIC + 4] == b"HdrS":
        return _inspect_bzimage(path, head)
    compression = None
    if head[:2] == b"\x1f\x8b":  # QEMU unpacks a gzipped arm64 Image itself
        compression = "gzip"
        try:
            head = zlib.decompressobj(wbits=31).decompress(head, 64)
        except zlib.error:
            head = b""
    offset, magic = _ARM64_MAGIC
    if head[offset : offset + len(magic)] == magic:
        return KernelInfo(path=path, format="image", arch="aarch64", compression=compression)
    raise SpecError(field, f"'{path}' {_NOT_A_KERNEL}")


def _inspect_elf(path: Path, f: io.BufferedReader, field: str) -> KernelInfo:
    try:
        elf = ELFFile(f)
        machine = str(elf["e_machine"])
        arch = _QEMU_ARCH.get(machine, machine.removeprefix("EM_").lower())
        if arch == "riscv":
            arch = f"riscv{elf.elfclass}"
        order = "<" if elf.little_endian else ">"
        blobs = [seg.data() for seg in elf.iter_segments() if seg["p_type"] == "PT_NOTE"] or [
            sec.data() for sec in elf.iter_sections() if sec["sh_type"] == "SHT_NOTE"
        ]
    except (ELFError, struct.error, ValueError) as e:
        raise SpecError(field, f"'{path}' is a damaged ELF file: {e}") from None
    entry = None
    for blob in blobs:
        entry = _pvh_entry(blob, order)
        if entry is not None:
            break
    return KernelInfo(path=path, format="elf", arch=arch, pvh_entry=entry)


def _pvh_entry(notes: bytes, order: str) -> int | None:
    """Find XEN_ELFNOTE_PHYS32_ENTRY in raw note data.

    Parsed by hand: pyelftools renames note types that collide with GNU ones,
    whatever the owner, so its ``n_type`` cannot be trusted for "Xen" notes.
    """
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from(order + "III", notes, pos)
        pos += 12
        name = notes[pos : pos + namesz].rstrip(b"\x00")
        pos += (namesz + 3) & ~3
        desc = notes[pos : pos + descsz]
        pos += (descsz + 3) & ~3
        if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
            if len(desc) == 4:
                return int(struct.unpack(order + "I", desc)[0])
            if len(desc) == 8:
                return int(struct.unpack(order + "Q", desc)[0])
    return None


def _inspect_bzimage(path: Path, head: bytes) -> KernelInfo:
    setup_sects = head[_SETUP_SECTS] or 4  # 0 means 4 (boot protocol, ancient kernels)
    version = struct.unpack_from("<H", head, _VERSION)[0]
    offset, length = struct.unpack_from("<II", head, _PAYLOAD_OFFSET)
    compression = None
    if version >= 0x208 and length:
        start = (setup_sects + 1) * 512 + offset
        with path.open("rb") as f:
            f.seek(start)
            magic = f.read(8)
        compression = next((n for m, n in _PAYLOAD_MAGIC if magic.startswith(m)), None)
    else:
        offset = length = 0
    return KernelInfo(
        path=path,
        format="bzimage",
        arch="x86_64",
        protocol_version=(version >> 8, version & 0xFF),
        payload_offset=offset or None,
        payload_length=length or None,
        compression=compression,
    )


def extract_vmlinux(bzimage: Path, dest: Path) -> Path:
    """Decompress the ELF vmlinux inside ``bzimage`` into ``dest``.

    The result must be an ELF with the PVH entry note, so it can be booted
    directly (``-kernel vmlinux`` on ``pc``/``q35``/``microvm``).

    Raises:
        SpecError: ``bzimage`` is not a bzImage, or its payload is damaged or
            has no PVH note.
        HostError: a decompressor the payload needs is not installed.
    """
    info = inspect_kernel(bzimage)
    if info.format != "bzimage" or info.payload_offset is None or info.payload_length is None:
        raise SpecError("kernel", f"'{bzimage}' is not a bzImage with a compressed payload")
    if info.compression is None:
        raise SpecError("kernel", f"'{bzimage}': unknown payload compression")
    with bzimage.open("rb") as f:
        head = f.read(_HEADER_END)
        f.seek(((head[_SETUP_SECTS] or 4) + 1) * 512 + info.payload_offset)
        payload = f.read(info.payload_length)
    # The build appends the decompressed size (le32) after the stream.
    expected = struct.unpack_from("<I", payload, len(payload) - 4)[0]
    stream = payload[:-4]
    log.info("extracting vmlinux from %s (%s payload)", bzimage, info.compression)
    try:
        data = _decompress(info.compression, stream)
    except (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError) as e:
        raise SpecError("kernel", f"'{bzimage}': cannot decompress payload: {e}") from None
    if len(data) != expected:
        log.warning("vmlinux size %d differs from the recorded %d", len(data), expected)
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(data)
    try:
        out = inspect_kernel(tmp)
    except SpecError:
        tmp.unlink()
        raise SpecError("kernel", f"'{bzimage}': payload is not an ELF vmlinux") from None
    if out.pvh_entry is None:
        tmp.unlink()
        raise SpecError("kernel", f"'{bzimage}': vmlinux has no PVH entry note (CONFIG_PVH=n)")
    tmp.replace(dest)
    return dest


def _decompress(kind: str, stream: bytes) -> bytes:
    if kind == "gzip":
        return gzip.decompress(stream)
    if kind == "xz":
        return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(stream)
    if kind == "lzma":
        return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(stream)
    if kind == "bzip2":
        return bz2.BZ2Decompressor().decompress(stream)
    tools = {"lz4": ("lz4", "lz4"), "zstd": ("zstd", "zstd"), "lzo": ("lzop", "lzop")}
    tool, package = tools[kind]
    exe = shutil.which(tool)
    if exe is None:
        raise HostError(
            f"decompressing a {kind} kernel needs `{tool}`; install it with: "
            f"{install_hint(package)}"
        )
    proc = subprocess.run([exe, "-dc"], input=stream, capture_output=True, check=False)
    if proc.returncode != 0:
        raise ValueError(proc.stderr.decode(errors="replace").strip() or f"{tool} failed")
    return proc.stdout


__all__ = ["XEN_ELFNOTE_PHYS32_ENTRY", "KernelInfo", "extract_vmlinux", "inspect_kernel"]
