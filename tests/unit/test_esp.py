"""The UEFI boot disk: GPT with one EFI system partition holding systemd-boot, a kernel,
an initrd and the loader entry -- checked with sfdisk and mtools, as firmware would see it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pyqvm.errors import ImageError
from pyqvm.image import esp
from pyqvm.spec.arches import ARCHES


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_the_boot_disk_holds_the_loader_where_firmware_looks(tmp_path: Path, arch: str) -> None:
    info = ARCHES[arch]
    tree = tmp_path / "tree"
    loader = tree / esp.SYSTEMD_BOOT_DIR / f"systemd-boot{info.efi_suffix}.efi"
    loader.parent.mkdir(parents=True)
    loader.write_bytes(b"MZ loader")
    (tmp_path / "vmlinuz").write_bytes(b"kernel" * 1000)
    (tmp_path / "initrd.img").write_bytes(b"initrd" * 1000)
    out = tmp_path / "boot.qcow2"
    esp.boot_disk(
        out,
        arch=info,
        loader=esp.systemd_boot(tree, info),
        kernel=tmp_path / "vmlinuz",
        initrd=tmp_path / "initrd.img",
        cmdline="console=ttyS0 root=LABEL=x",
        title="t",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "boot.qcow2",
        "initrd.img",
        "tree",
        "vmlinuz",
    ]
    raw = tmp_path / "boot.img"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(out), str(raw)], check=True)
    table = json.loads(subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True,
                                      text=True, check=True).stdout)["partitiontable"]  # fmt: skip
    assert table["label"] == "gpt"
    (part,) = table["partitions"]
    assert part["type"] == esp.ESP_TYPE and part["start"] == 2048
    image = f"{raw}@@{part['start'] * 512}"

    def mtype(path: str) -> bytes:
        return subprocess.run(["mtype", "-i", image, path], capture_output=True, check=True).stdout

    assert mtype(f"::/EFI/BOOT/BOOT{info.efi_suffix.upper()}.EFI") == b"MZ loader"
    assert mtype("::/vmlinuz") == b"kernel" * 1000
    assert mtype("::/loader/loader.conf") == b"default pyqvm.conf\ntimeout 0\n"
    entry = mtype("::/loader/entries/pyqvm.conf").decode()
    assert "linux /vmlinuz\ninitrd /initrd.img\noptions console=ttyS0 root=LABEL=x\n" in entry


def test_a_tree_without_systemd_boot_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"no systemd-bootaa64\.efi"):
        esp.systemd_boot(tmp_path, ARCHES["aarch64"])
