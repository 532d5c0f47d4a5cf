"""host/kernel.py on small hand-made ELF and bzImage files."""

from __future__ import annotations

import gzip
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pyqvm.errors import HostError, SpecError
from pyqvm.host.kernel import XEN_ELFNOTE_PHYS32_ENTRY, extract_vmlinux, inspect_kernel

EM_X86_64 = 62
EM_AARCH64 = 183


def _pad4(b: bytes) -> bytes:
    return b + b"\x00" * (-len(b) % 4)


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    name += b"\x00"
    return struct.pack("<III", len(name), len(desc), ntype) + _pad4(name) + _pad4(desc)


def elf(machine: int = EM_X86_64, notes: bytes = b"") -> bytes:
    """A minimal ELF64 executable with one PT_NOTE segment holding ``notes``."""
    phoff, phnum = 64, 1
    data_off = phoff + 56 * phnum
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\x00" * 8
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH", 2, machine, 1, 0x1000000, phoff, 0, 0, 64, 56, phnum, 64, 0, 0
    )
    phdr = struct.pack("<IIQQQQQQ", 4, 4, data_off, 0, 0, len(notes), len(notes), 4)  # PT_NOTE
    return header + phdr + notes


PVH_NOTES = (
    note(b"Xen", 6, b"linux\x00")
    + note(b"Xen", 5, b"xen-3.0\x00")  # type 5 collides with NT_GNU_PROPERTY_TYPE_0
    + note(b"GNU", 3, b"\x01" * 20)
    + note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<Q", 0x1000850))
)


def bzimage(payload: bytes, version: int = 0x20F, setup_sects: int = 1) -> bytes:
    """A bzImage-shaped file: setup header, then the payload after the setup sectors."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    offset = 0x40  # payload_offset is relative to the protected-mode code
    struct.pack_into("<II", setup, 0x248, offset, len(payload))
    return bytes(setup) + b"\x90" * offset + payload + b"\x00" * 16


def kernel_payload(vmlinux: bytes, compress: str = "gzip") -> bytes:
    """Compress like the kernel build: the stream, then the decompressed size (le32)."""
    if compress == "gzip":
        stream = gzip.compress(vmlinux)
    else:
        stream = subprocess.run(
            ["lz4", "-l", "-9", "-c"], input=vmlinux, capture_output=True, check=True
        ).stdout
    return stream + struct.pack("<I", len(vmlinux))


def test_elf_with_pvh_note(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(elf(notes=PVH_NOTES))
    info = inspect_kernel(path)
    assert (info.format, info.arch, info.pvh_entry) == ("elf", "x86_64", 0x1000850)
    assert info.pvh_capable


def test_pvh_note_with_32_bit_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(elf(notes=note(b"Xen", 18, struct.pack("<I", 0x100000))))
    assert inspect_kernel(path).pvh_entry == 0x100000


def test_elf_without_pvh_note_is_reported_not_refused(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    # type 18 from another owner is not the PVH note
    path.write_bytes(elf(notes=note(b"GNU", 18, b"\x00" * 8)))
    info = inspect_kernel(path)
    assert info.format == "elf" and info.pvh_entry is None and not info.pvh_capable


def test_elf_arch_maps_to_qemu_name(tmp_path: Path) -> None:
    path = tmp_path / "Image"
    path.write_bytes(elf(machine=EM_AARCH64))
    assert inspect_kernel(path).arch == "aarch64"


def test_bzimage_header(tmp_path: Path) -> None:
    path = tmp_path / "vmlinuz"
    path.write_bytes(bzimage(b"\x02\x21\x4c\x18" + b"\x00" * 32))
    info = inspect_kernel(path)
    assert info.format == "bzimage" and info.arch == "x86_64"
    assert info.protocol_version == (2, 15)
    assert (info.payload_offset, info.payload_length) == (0x40, 36)
    assert info.compression == "lz4"
    assert info.pvh_entry is None


@pytest.mark.parametrize(
    ("magic", "name"),
    [
        (b"\x1f\x8b\x08\x00", "gzip"),
        (b"\xfd7zXZ\x00\x00\x01", "xz"),
        (b"\x28\xb5\x2f\xfd", "zstd"),
        (b"BZh9", "bzip2"),
        (b"\x5d\x00\x00\x80", "lzma"),
        (b"\x89LZO\x00", "lzo"),
        (b"\x00\x00\x00\x00", None),
    ],
)
def test_bzimage_compression_from_magic(tmp_path: Path, magic: bytes, name: str | None) -> None:
    path = tmp_path / "vmlinuz"
    path.write_bytes(bzimage(magic + b"\x00" * 16))
    assert inspect_kernel(path).compression == name


def test_garbage_is_refused_with_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"hello, this is not a kernel\n" * 40)
    with pytest.raises(
        SpecError, match=r"neither an ELF vmlinux, a bzImage nor an arm64 Image"
    ) as err:
        inspect_kernel(path, field="machine.kernel")
    assert err.value.field == "machine.kernel"
    assert "/boot/vmlinuz-*" in str(err.value)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope"
    with pytest.raises(SpecError, match="no such file") as err:
        inspect_kernel(path)
    assert str(path) in str(err.value) and err.value.field == "kernel"


def test_extract_gzip_payload(tmp_path: Path) -> None:
    vmlinux = elf(notes=PVH_NOTES)
    src = tmp_path / "vmlinuz"
    src.write_bytes(bzimage(kernel_payload(vmlinux)))
    out = extract_vmlinux(src, tmp_path / "vmlinux")
    assert out.read_bytes() == vmlinux
    assert inspect_kernel(out).pvh_entry == 0x1000850


def test_extract_lz4_legacy_payload(tmp_path: Path) -> None:
    assert shutil.which("lz4"), "the lz4 CLI is missing: apt-get install -y lz4"
    vmlinux = elf(notes=PVH_NOTES) + bytes(range(256)) * 64
    src = tmp_path / "vmlinuz"
    src.write_bytes(bzimage(kernel_payload(vmlinux, "lz4")))
    assert inspect_kernel(src).compression == "lz4"
    assert extract_vmlinux(src, tmp_path / "vmlinux").read_bytes() == vmlinux


def test_extract_refuses_vmlinux_without_pvh_note(tmp_path: Path) -> None:
    src = tmp_path / "vmlinuz"
    src.write_bytes(bzimage(kernel_payload(elf())))
    with pytest.raises(SpecError, match="no PVH entry note"):
        extract_vmlinux(src, tmp_path / "vmlinux")
    assert not (tmp_path / "vmlinux").exists()
    assert not list(tmp_path.glob("*.part"))


def test_extract_refuses_an_elf(tmp_path: Path) -> None:
    src = tmp_path / "vmlinux"
    src.write_bytes(elf(notes=PVH_NOTES))
    with pytest.raises(SpecError, match="not a bzImage"):
        extract_vmlinux(src, tmp_path / "out")


def test_missing_decompressor_names_the_debian_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "vmlinuz"
    src.write_bytes(bzimage(b"\x02\x21\x4c\x18" + b"\x00" * 32))
    monkeypatch.setattr("shutil.which", lambda *_args, **_kw: None)
    with pytest.raises(HostError, match=r"apt-get install -y lz4"):
        extract_vmlinux(src, tmp_path / "vmlinux")
