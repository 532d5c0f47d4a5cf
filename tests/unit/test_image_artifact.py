"""An image as one file: export, import, and every corrupt or edited export refused with
nothing left in the cache (issue 23). E2e (tests/e2e/test_portable_build.py) boots one."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from fixtures.smalldisk import run_on_small_disk

from pyqvm.errors import ImageError
from pyqvm.image.artifact import INDEX, export_image, import_image
from pyqvm.image.guest import MANIFEST_FORMAT, GuestImage, load_image

Members = list[tuple[str, bytes]]


def built(cache: Path, key: str = "0123456789abcdef") -> GuestImage:
    d = cache / "images" / f"default-{key}"
    d.mkdir(parents=True)
    for name, size in (("vmlinux", 3000), ("vmlinuz", 2000), ("initrd.img", 5000)):
        (d / name).write_bytes(bytes(range(256)) * (size // 256))
    (d / "disk.qcow2").write_bytes(b"QFI\xfb" + b"\0" * 70000)  # compresses: a sparse disk
    manifest = {
        "format": MANIFEST_FORMAT, "flavour": "default", "kernel": "vmlinux",
        "bzimage": "vmlinuz", "initrd": "initrd.img", "disk": "disk.qcow2",
        "kernel_version": "6.1.0-57-cloud-amd64", "ready_marker": "pyqvm-guest-ready",
        "packages": {"busybox-static": "1:1.35.0-4+deb12u1+b1"},
    }  # fmt: skip
    (d / "manifest.json").write_text(json.dumps(manifest))
    image = load_image(d)
    assert image is not None
    return image


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def members(export: Path) -> Members:
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(export.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]


def rewrite(export: Path, change: Callable[[Members], Members]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in change(members(export)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    export.write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue()))


def nothing_imported(cache: Path) -> bool:
    images = cache / "images"
    return not images.exists() or not any(images.iterdir())


@pytest.fixture
def export(tmp_path: Path) -> tuple[GuestImage, Path, str]:
    image = built(tmp_path / "src")
    out = export_image(image, tmp_path / "default.pqi")
    return image, out.path, out.digest


def test_export_then_import_gives_the_same_image(
    export: tuple[GuestImage, Path, str], tmp_path: Path
) -> None:
    image, path, digest = export
    index = json.loads(dict(members(path))[INDEX])
    assert index["flavour"] == "default" and index["arch"] == "x86_64"
    assert index["packages"] == {"busybox-static": "1:1.35.0-4+deb12u1+b1"}
    assert (
        index["files"]["disk.qcow2"]["sha256"]
        == hashlib.sha256(image.disk.read_bytes()).hexdigest()
    )
    assert members(path)[0][0] == INDEX  # first, so import checks as it streams
    assert digest == "sha256:" + hashlib.sha256(dict(members(path))[INDEX]).hexdigest()
    got = import_image(path, cache=tmp_path / "dst", digest=digest)
    assert got.directory == tmp_path / "dst" / "images" / image.directory.name
    assert files_of(got.directory) == files_of(image.directory)
    assert [p.name for p in (tmp_path / "dst/images").iterdir()] == [image.directory.name]


def flip(data: bytes, at: int = 100) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]


CHANGES: dict[str, tuple[Callable[[Members], Members], str]] = {
    "one byte of a file": (
        lambda m: [(n, flip(d) if n == "initrd.img" else d) for n, d in m],
        "initrd.img is not the file its index names",
    ),
    "a file missing": (lambda m: [(n, d) for n, d in m if n != "vmlinuz"], "it lacks vmlinuz"),
    "a file added": (lambda m: [*m, ("evil.sh", b"rm -rf /")], "'evil.sh' is not in its index"),
    "no index first": (lambda m: m[1:], "its first member is 'disk.qcow2'"),
    "a path in the index": (
        lambda m: [(INDEX, m[0][1].replace(b'"vmlinux"', b'"../vmlinux"')), *m[1:]],
        "its pyqvm-image.json is not an index of format 1",
    ),
}


@pytest.mark.parametrize("change", CHANGES)
def test_an_edited_export_is_refused_and_leaves_nothing(
    export: tuple[GuestImage, Path, str], tmp_path: Path, change: str
) -> None:
    _, path, _ = export
    edit, why = CHANGES[change]
    rewrite(path, edit)
    with pytest.raises(ImageError, match=f"not an intact pyqvm image export: {why}"):
        import_image(path, cache=tmp_path / "dst")
    assert nothing_imported(tmp_path / "dst")


def test_an_export_edited_with_its_index_is_refused_by_its_digest(
    export: tuple[GuestImage, Path, str], tmp_path: Path
) -> None:
    _, path, digest = export

    def consistent_edit(m: Members) -> Members:
        files = dict(m)
        files["initrd.img"] = b"another initramfs"
        index = json.loads(files[INDEX])
        index["files"]["initrd.img"] = {
            "size": len(files["initrd.img"]),
            "sha256": hashlib.sha256(files["initrd.img"]).hexdigest(),
        }
        files[INDEX] = json.dumps(index).encode()
        return [(INDEX, files.pop(INDEX)), *files.items()]

    rewrite(path, consistent_edit)
    with pytest.raises(ImageError, match=f"its digest is sha256:[0-9a-f]+, not the {digest}"):
        import_image(path, cache=tmp_path / "dst", digest=digest)
    assert nothing_imported(tmp_path / "dst")


@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_a_truncated_export_is_refused(
    export: tuple[GuestImage, Path, str], tmp_path: Path, keep: float
) -> None:
    _, path, _ = export
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        import_image(path, cache=tmp_path / "dst")
    assert nothing_imported(tmp_path / "dst")


def test_not_an_export_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pqi"
    junk.write_bytes(b"hello")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        import_image(junk, cache=tmp_path / "dst")
    assert nothing_imported(tmp_path / "dst")


def test_a_full_disk_while_importing_is_an_error_and_leaves_nothing(
    export: tuple[GuestImage, Path, str], tmp_path: Path
) -> None:
    _, path, _ = export
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = textwrap.dedent(f"""
        from pathlib import Path
        from pyqvm.errors import ImageError
        from pyqvm.image.artifact import import_image
        cache = Path({str(mnt)!r})
        try:
            import_image(Path({str(path)!r}), cache=cache)
        except ImageError as e:
            print("ERROR", e)
        print("LEFT", sorted(p.name for p in (cache / "images").iterdir()))
    """)
    out = run_on_small_disk(mnt, "48k", script)
    assert "ERROR no space left on the device" in out, out
    assert "LEFT []" in out
