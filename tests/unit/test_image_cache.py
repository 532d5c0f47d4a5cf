"""Image cache: keys, manifests, find(), host-tool errors; nothing downloaded or booted."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pyqvm.errors import HostError, ImageError, SpecError
from pyqvm.image import (
    FLAVOURS,
    GuestImage,
    build,
    builder,
    built_images,
    cache_dir,
    find,
    prune,
)
from pyqvm.image.archive import Package
from pyqvm.image.guest import MANIFEST_FORMAT, cache_key, load_image


def package(name: str, version: str, *, depends: str = "") -> Package:
    return Package(name, version, "amd64", f"pool/{name}.deb", "0" * 64, 1, "file:///m", depends)


def test_cache_key_is_order_independent_and_input_sensitive() -> None:
    a = {"flavour": "default", "kernel": "linux-image-x=1", "recipe:init": "abc"}
    b = dict(reversed(list(a.items())))
    assert cache_key(a) == cache_key(b)
    assert cache_key(a) != cache_key({**a, "recipe:init": "abd"})
    assert len(cache_key(a)) == 16


def test_recipe_digests_follow_file_contents(tmp_path: Path) -> None:
    (tmp_path / "init").write_text("echo one\n")
    (tmp_path / "modules.txt").write_text("virtio_pci\n")
    before = builder.recipe_digests(tmp_path)
    assert set(before) == {"init", "modules.txt"}
    (tmp_path / "init").write_text("echo two\n")
    assert builder.recipe_digests(tmp_path)["init"] != before["init"]


def test_shipped_recipes_are_complete() -> None:
    names = set(builder.recipe_digests())
    assert {
        *builder.INITRD_FILES,
        *builder.INITRD_PROGRAMS,
        *builder.DISK_FILES,
        "modules.txt",
    } <= names


def test_kernel_package_from_meta_depends() -> None:
    meta = package(
        "linux-image-cloud-amd64",
        "6.1.192-2",
        depends="linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)",
    )
    assert builder.kernel_package(meta) == ("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2")
    loose = package("m", "1", depends="initramfs-tools | linux-image-6.1.0-1-amd64")
    assert builder.kernel_package(loose) == ("linux-image-6.1.0-1-amd64", None)
    with pytest.raises(ImageError, match="cannot tell which kernel"):
        builder.kernel_package(package("m", "1", depends="libc6"))


def test_deb_file_name_quotes_the_epoch() -> None:
    pkg = package("busybox-static", "1:1.35.0-4+deb12u1+b1")
    assert pkg.deb_name == "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PYQVM_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("PYQVM_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "pyqvm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "pyqvm"


def fake_image(cache: Path, flavour: str, key: str, built_at: float) -> Path:
    d = cache / "images" / f"{flavour}-{key}"
    d.mkdir(parents=True)
    for name in ("vmlinux", "vmlinuz", "initrd.img", "disk.qcow2"):
        (d / name).write_bytes(b"x")
    manifest = {
        "format": MANIFEST_FORMAT,
        "flavour": flavour,
        "kernel": "vmlinux",
        "bzimage": "vmlinuz",
        "initrd": "initrd.img",
        "disk": "disk.qcow2",
        "kernel_version": "6.1.0-56-cloud-amd64",
        "ready_marker": "pyqvm-guest-ready",
        "built_at": built_at,
    }
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def test_find_without_images_says_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"run `pyqvm image build --flavour full`"):
        find("full", cache=tmp_path)


def test_find_returns_the_newest_complete_image(tmp_path: Path) -> None:
    old = fake_image(tmp_path, "default", "aaaa", 1.0)
    new = fake_image(tmp_path, "default", "bbbb", 2.0)
    os.utime(old / "manifest.json", (1, 1))
    fake_image(tmp_path, "full", "cccc", 3.0)
    broken = fake_image(tmp_path, "default", "dddd", 4.0)
    (broken / "initrd.img").unlink()  # incomplete: ignored
    image = find("default", cache=tmp_path)
    assert isinstance(image, GuestImage)
    assert image.directory == new and image.kernel == new / "vmlinux"
    assert image.ready_marker == "pyqvm-guest-ready"
    assert find("full", cache=tmp_path).flavour == "full"
    assert load_image(broken) is None


def test_unknown_flavour(tmp_path: Path) -> None:
    assert FLAVOURS == ("default", "full", "debian")
    with pytest.raises(SpecError, match="unknown guest flavour") as err:
        build("tiny", cache=tmp_path)
    assert err.value.field == "flavour"
    with pytest.raises(SpecError):
        find("tiny", cache=tmp_path)


def test_missing_tool_names_the_debian_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shutil.which

    def which(name: str, path: str | None = None) -> str | None:
        return None if name == "depmod" else real(name, path=path)

    monkeypatch.setattr("shutil.which", which)
    with pytest.raises(HostError, match=r"apt-get install -y kmod"):
        build("default", cache=tmp_path)


def test_prune_keeps_the_newest_of_each_flavour(tmp_path: Path) -> None:
    dirs = {}
    for i, (flavour, key) in enumerate(
        [("default", "old1"), ("default", "old2"), ("default", "new"), ("full", "only")]
    ):
        dirs[key] = fake_image(tmp_path, flavour, key, float(i))
        os.utime(dirs[key] / "manifest.json", (i + 1, i + 1))
    assert [i.directory for i in built_images(cache=tmp_path)] == [
        dirs["only"],
        dirs["new"],
        dirs["old2"],
        dirs["old1"],
    ]
    would = prune(cache=tmp_path, dry_run=True)
    assert {i.directory for i in would} == {dirs["old1"], dirs["old2"]}
    assert all(d.is_dir() for d in dirs.values())
    gone = prune(cache=tmp_path)
    assert {i.directory for i in gone} == {dirs["old1"], dirs["old2"]}
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["default-new", "full-only"]
    assert find("default", cache=tmp_path).directory == dirs["new"]
    assert prune(cache=tmp_path) == []
