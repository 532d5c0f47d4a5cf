"""Guests none of us wrote (issue 25): Debian's installer, from the package
``debian-installer-12-netboot-amd64``, driven with no agent and no pyqvm part in it.

- its kernel and initrd with a serial console: its text front end is answered with
  ``expect``/``sendline`` through language, location and keyboard to the next screen;
- PXE: the emulated profile's firmware (SeaBIOS) and e1000 ROM network-boot the package's
  netboot tree from QEMU's own TFTP server; its boot menu is found on the VGA screen by
  OCR and by a reference image, moved through and chosen with keys, and the installer's
  first screen follows.

And a signed boot chain none of us wrote, under Secure Boot with a virtual TPM.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from fixtures.secureboot import MIN_MEMORY_MIB, PROOF, signed_boot_disk
from PIL import Image, ImageStat

from pyqvm import AsyncVM, Disk, KernelBoot, Network, VMSpec
from pyqvm.errors import PyqvmTimeoutError

pytestmark = [pytest.mark.qemu, pytest.mark.asyncio]

#: The netboot tree of the text installer (pxelinux.0, its menus, linux and initrd.gz).
NETBOOT = Path("/usr/lib/debian-installer/images/12/amd64/text")
INSTALLER = NETBOOT / "debian-installer" / "amd64"
#: The text front end's question line, after the numbered choices.
QUESTION = r"Prompt: '\?' for help, default=\d+> "


async def answer(vm: AsyncVM, heading: str, choice: str) -> None:
    """Answer the text front end's question under ``heading`` with ``choice``'s number."""
    await vm.console.expect(re.escape(heading), timeout=300)
    number = await vm.console.expect(rf"(\d+): {re.escape(choice)}\b", timeout=60)
    await vm.console.expect(QUESTION, timeout=60)
    await vm.console.sendline(number.groups[0] or "")


async def test_the_installer_is_answered_on_its_serial_console() -> None:
    spec = VMSpec(
        name="d-i-serial",
        machine="q35",
        kernel=KernelBoot(
            INSTALLER / "linux",
            INSTALLER / "initrd.gz",
            "console=ttyS0,115200 DEBIAN_FRONTEND=text TERM=dumb",
        ),
        guest_agent=False,
        ready="none",
        memory=1024,
    )
    async with AsyncVM(spec) as vm:
        await answer(vm, "Select a language", "English")
        await answer(vm, "Select your location", "United States")
        await answer(vm, "Configure the keyboard", "American English")
        # The next step starts at once (its progress line); its question follows some 25 s
        # of driver probing later, which this test does not need to sit through.
        later = await vm.console.expect(
            ["Detecting network hardware", "Detect network hardware", "hostname"],
            timeout=600,
        )
        assert later.pattern in later.text
        assert "Configure the keyboard" not in later.before  # a screen after it


def crop(png: bytes, region: tuple[int, int, int, int]) -> bytes:
    left, top, width, height = region
    out = io.BytesIO()
    Image.open(io.BytesIO(png)).crop((left, top, left + width, top + height)).save(out, "PNG")
    return out.getvalue()


def black(region: tuple[int, int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", region[2:], (0, 0, 0)).save(out, "PNG")
    return out.getvalue()


def non_blank(png: bytes) -> bool:
    """More than one colour on the screen, and not all of it dark."""
    stat = ImageStat.Stat(Image.open(io.BytesIO(png)).convert("L"))
    low, high = stat.extrema[0]
    return high - low > 64 and stat.stddev[0] > 8


async def test_the_installer_network_boots_and_its_menu_is_driven_by_screen_and_keys(
    tmp_path: Path,
) -> None:
    spec = VMSpec(
        name="d-i-pxe",
        profile="emulated",
        machine="pc",  # SeaBIOS with the e1000's PXE ROM
        display="vga",
        guest_agent=False,
        ready="none",
        memory=1024,
        networks=(Network(tftp=NETBOOT, bootfile="pxelinux.0"),),
    )
    async with AsyncVM(spec) as vm:
        read = await vm.wait_for_text(r"installer menu", timeout=180)
        assert "Advanced options" in read  # (the highlighted "Install" reads poorly)
        menu = await vm.screenshot(tmp_path / "menu.png")
        # The menu's title as a reference image (an openQA needle): matched in its region,
        # and a black one of that size is not.
        title = (128, 148, 384, 24)
        needle = crop(menu, title)
        assert await vm.wait_for_screen(needle, region=title, threshold=0.01) <= 0.01
        with pytest.raises(PyqvmTimeoutError, match="did not match"):
            await vm.wait_for_screen(black(title), region=title, timeout=1)
        await vm.keys.press("down")  # the highlight moves to "Advanced options"
        await vm.wait_screen_change(timeout=60)
        await vm.keys.press("up")
        await vm.wait_screen_stable(seconds=1.0, timeout=60)
        await vm.keys.press("ret")  # "Install", the first item
        read = await vm.wait_for_text(r"(?i)select a language", timeout=600)
        assert "Choose the language" in read
        first = await vm.screenshot(tmp_path / "language.png")
    for png in (menu, first):
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and non_blank(png)
    assert (tmp_path / "menu.png").read_bytes() == menu


async def test_a_uefi_guest_with_secure_boot_enforced_sees_its_tpm(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A boot chain none of us signed (shim by Microsoft's UEFI CA, GRUB and the kernel by
    Debian) under OVMF with Secure Boot enforced and a swtpm TPM 2.0; the guest says what it
    sees, and swtpm is gone with the VM."""
    disk = signed_boot_disk(tmp_path_factory.mktemp("secureboot"))
    spec = VMSpec(
        name="sb",
        firmware="ovmf",
        secure_boot=True,
        tpm=True,
        disks=(Disk(disk, format="raw"),),
        guest_agent=False,
        ready="none",
        memory=MIN_MEMORY_MIB,
    )
    async with AsyncVM(spec) as vm:
        swtpm = vm.machine.companions.swtpm.pid
        assert swtpm is not None and Path(f"/proc/{swtpm}").exists()
        proof = await vm.console.expect(PROOF, timeout=300)
        assert proof.groups == ("01", "2")  # Secure Boot on, a TPM 2.0
        rundir = vm.runtime_dir
    assert rundir is not None and not rundir.exists()
    assert not Path(f"/proc/{swtpm}").exists()
