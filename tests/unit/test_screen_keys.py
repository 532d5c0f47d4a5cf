"""Keys (a US keymap onto QEMU's qcodes), screen comparison, and the spec parts that a
guest with nothing of ours boots from: a display, and PXE through QEMU's TFTP."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from pyqvm import preview_argv
from pyqvm.errors import SpecError
from pyqvm.ops.keys import chord, keystrokes
from pyqvm.ops.screen import difference
from pyqvm.spec import Network, VMSpec


def test_a_chord_names_qemu_keys_and_aliases() -> None:
    assert chord("ctrl-alt-f2") == ["ctrl", "alt", "f2"]
    assert chord("Enter") == ["ret"] and chord("ctrl--") == ["ctrl", "minus"]
    with pytest.raises(SpecError, match="'hyper'"):
        chord("ctrl-hyper")


def test_text_is_typed_with_shift_where_a_us_keyboard_needs_it() -> None:
    assert keystrokes("aB!\n") == [["a"], ["shift", "b"], ["shift", "1"], ["ret"]]
    assert keystrokes('~|"') == [["shift", "grave_accent"], ["shift", "backslash"],
                                 ["shift", "apostrophe"]]  # fmt: skip
    with pytest.raises(SpecError) as e:
        keystrokes("naïve")
    assert e.value.field == "text[2]" and "US keymap" in e.value.message


def _png(color: tuple[int, int, int], size: tuple[int, int] = (8, 4)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


def test_screen_difference_is_a_mean_from_0_to_1_over_a_region() -> None:
    black, white = _png((0, 0, 0)), _png((255, 255, 255))
    assert difference(black, black) == 0.0 and difference(black, white) == 1.0
    half = Image.new("RGB", (8, 4), (0, 0, 0))
    half.paste((255, 255, 255), (4, 0, 8, 4))
    out = io.BytesIO()
    half.save(out, "PNG")
    assert difference(out.getvalue(), _png((0, 0, 0), (4, 4)), region=(0, 0, 4, 4)) == 0.0
    with pytest.raises(SpecError, match="reference is 8x4, the region 4x4"):
        difference(out.getvalue(), black, region=(4, 0, 4, 4))
    with pytest.raises(SpecError, match="past the screen"):
        difference(black, black, region=(4, 0, 8, 4))


def test_pxe_through_qemu_tftp_goes_first_in_the_boot_order(tmp_path: Path) -> None:
    (tmp_path / "pxelinux.0").write_bytes(b"\0")
    net = Network(tftp=tmp_path, bootfile="pxelinux.0")
    spec = VMSpec(profile="emulated", machine="pc", display="vga", guest_agent=False,
                  ready="none", networks=(net,))  # fmt: skip
    argv = preview_argv(spec)
    netdev = json.loads(argv[argv.index("-netdev") + 1])
    assert (netdev["tftp"], netdev["bootfile"]) == (str(tmp_path), "pxelinux.0")
    devices = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-device"]
    nic = next(d for d in devices if d.get("netdev") == "net0")
    assert nic["driver"] == "e1000" and nic["bootindex"] == 0 and "romfile" not in nic
    assert {"driver": "VGA", "id": "pq-display"} in devices and "-vnc" in argv


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"tftp": "/no/such/dir", "bootfile": "x"}, "network.tftp"),
        ({"tftp": "."}, "network.bootfile"),
        ({"tftp": ".", "bootfile": "missing.0"}, "network.bootfile"),
        ({"mode": "tap", "tap": "tap0", "bootfile": "x"}, "network.bootfile"),
    ],
)
def test_a_pxe_source_that_cannot_work_is_refused(kw: dict[str, object], field: str) -> None:
    with pytest.raises(SpecError) as e:
        Network(**kw)  # type: ignore[arg-type]
    assert e.value.field == field


def test_a_display_needs_a_machine_with_pci() -> None:
    assert VMSpec(image="default", display="vga").effective_machine == "q35"
    with pytest.raises(SpecError, match="microvm has no PCI bus for a graphics card"):
        VMSpec(image="default", display="vga", machine="microvm")
    with pytest.raises(SpecError, match="virtio-gpu"):
        VMSpec(arch="aarch64", image="default", display="vga")


def _bootindex(argv: list[str]) -> dict[str, int]:
    devices = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-device"]
    return {d["id"]: d["bootindex"] for d in devices if "bootindex" in d}


def test_the_boot_order_puts_a_cdrom_before_the_disk(files: dict[str, Path]) -> None:
    from pyqvm.spec import Disk

    iso = files["raw"]
    base = {"profile": "emulated", "guest_agent": False, "ready": "none",
            "disks": (Disk(files["qcow2"]),), "cdroms": (iso,)}  # fmt: skip
    assert _bootindex(preview_argv(VMSpec(**base))) == {"disk0": 0}  # type: ignore[arg-type]
    spec = VMSpec(boot_order=("cdrom", "disk"), **base)  # type: ignore[arg-type]
    assert _bootindex(preview_argv(spec)) == {"cd0": 0, "disk0": 1}
    spec = VMSpec(boot_order=["network", "cdrom"], networks=(Network(),), **base)  # type: ignore[arg-type]
    assert _bootindex(preview_argv(spec)) == {"net0": 0, "cd0": 1}


@pytest.mark.parametrize(
    ("kw", "field", "message"),
    [
        ({"boot_order": ("cdrom",)}, "boot_order[0]", "no cdrom"),
        ({"boot_order": ("floppy",)}, "boot_order[0]", "floppy"),
        ({"boot_order": ("network", "network"), "networks": (Network(),)}, "boot_order[1]",
         "twice"),
        ({"boot_order": ("network",), "networks": (Network(),), "image": "default"}, "boot_order",
         "kernel boots directly"),
    ],
)  # fmt: skip
def test_a_boot_order_that_cannot_be_is_refused(
    kw: dict[str, object], field: str, message: str
) -> None:
    with pytest.raises(SpecError, match=message) as e:
        VMSpec(**kw)  # type: ignore[arg-type]
    assert e.value.field == field


def test_ocr_without_tesseract_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from pyqvm.errors import HostError
    from pyqvm.ops import screen

    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(HostError, match="apt-get install tesseract-ocr"):
        screen.ocr(_png((0, 0, 0)))
