"""The ``debian`` flavour: a real Debian 12 system (systemd, udev, qemu-guest-agent,
cloud-init) bootstrapped by pyqvm in two stages, booted in both device profiles; and
its aarch64 build."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fixtures.nonroot import NonrootBuild

from pyqvm import AsyncVM, Disk, Network, VMSpec, image, imagebuild, templates
from pyqvm.image.artifact import export_image, import_image
from pyqvm.image.guest import load_image
from pyqvm.spec.cloudinit import CloudInit

pytestmark = [pytest.mark.e2e, pytest.mark.distro]


@pytest.fixture(scope="session")
def debian_image(request: pytest.FixtureRequest) -> image.GuestImage:
    """The debian flavour of the current recipe. When this session also runs the non-root
    build (`fixtures.nonroot`), that build is the one booted here: exported and imported,
    as a CI job carries an image, so a run bootstraps the flavour once."""
    if any("nonroot_debian" in getattr(i, "fixturenames", ()) for i in request.session.items):
        built: NonrootBuild = request.getfixturevalue("nonroot_debian")
        made = load_image(Path(built.out["dir"]))
        assert made is not None
        return import_image(export_image(made, built.home / "debian.pqi").path)
    return imagebuild.build("debian")


@pytest.mark.asyncio
@pytest.mark.parametrize("profile", ["virtio", "emulated"])
async def test_the_debian_flavour_reaches_a_running_system(
    debian_image: image.GuestImage, profile: str
) -> None:
    spec = VMSpec(
        name=f"deb-{profile}",
        image="debian",
        profile=profile,  # type: ignore[arg-type]
        networks=(Network(),),
        ready_timeout=300,
    )
    async with AsyncVM(spec) as vm:
        state = await vm.run(["systemctl", "is-system-running", "--wait"], timeout=240)
        failed = await vm.run(["systemctl", "--failed", "--no-legend", "--plain"])
        print(f"{profile}: {state.stdout_text.strip()}; failed units: {failed.stdout_text!r}")
        assert state.stdout_text.strip() in ("running", "degraded"), failed.stdout_text
        assert (await vm.run(["cat", "/proc/1/comm"], check=True)).stdout_text == "systemd\n"
        # The devices of the profile: virtio disk and NIC, or AHCI and e1000(e).
        drivers = await vm.run(
            ["sh", "-c", "readlink /sys/class/net/e*/device/driver; ls /sys/block"], check=True
        )
        if profile == "virtio":
            assert "virtio_net" in drivers.stdout_text and "vda" in drivers.stdout_text
        else:
            assert "e1000" in drivers.stdout_text and "sda" in drivers.stdout_text


@pytest.mark.asyncio
async def test_without_a_nic_the_boot_does_not_wait_for_the_network(
    debian_image: image.GuestImage,
) -> None:
    """The image's drop-in: systemd-networkd-wait-online (which cloud-init, sysinit.target and
    so the agent wait for) finds no NIC and succeeds instead of timing out after 2 minutes."""
    spec = VMSpec(name="deb-nonic", image="debian", networks=(), ready_timeout=300)
    async with AsyncVM(spec) as vm:
        await vm.run(["systemctl", "is-system-running", "--wait"], timeout=240)
        show = ["systemctl", "show", "-P", "Result", "systemd-networkd-wait-online.service"]
        assert (await vm.run(show, check=True)).stdout_text == "success\n"
        net = await vm.run(["ls", "/sys/class/net"], check=True)
        assert net.stdout_text == "lo\n"


@pytest.mark.asyncio
async def test_a_template_of_the_debian_flavour_clones(
    debian_image: image.GuestImage, tmp_path: Path
) -> None:
    """A systemd guest of pyqvm's own making, frozen after its setup: each clone starts from
    the running system (no boot) with its own random state, given by the image's
    pyqvm-wake.service (udev starts it on its port; a clone is refused if it does not answer)."""
    spec = VMSpec(name="debt", image="debian", networks=(Network(),), ready_timeout=300)
    setup = [
        "systemctl is-system-running --wait || true",
        "echo set-up > /root/s",
        "systemctl is-active pyqvm-wake",
    ]
    t = await templates.create(spec, "deb", directory=tmp_path / "t", setup=setup)
    a = await AsyncVM.from_template(t)
    b = await AsyncVM.from_template(t)
    try:
        sh = "cat /root/s; cat /proc/1/comm; head -c 16 /dev/urandom | od -An -tx1"
        out_a = (await a.run(["sh", "-c", sh], check=True)).stdout_text.splitlines()
        out_b = (await b.run(["sh", "-c", sh], check=True)).stdout_text.splitlines()
        assert out_a[:2] == out_b[:2] == ["set-up", "systemd"]
        assert out_a[2] != out_b[2]
        state = await a.run(["systemctl", "is-system-running"])
        assert state.stdout_text.strip() in ("running", "degraded")
    finally:
        await a.stop()
        await b.stop()


SEED = """#cloud-config
hostname: seeded
write_files:
  - path: /etc/pyqvm-seed.txt
    content: "from the seed\\n"
runcmd:
  - [sh, -c, "echo ran > /run/pyqvm-runcmd"]
"""


@pytest.mark.asyncio
async def test_a_cloud_init_seed_is_applied(debian_image: image.GuestImage) -> None:
    spec = VMSpec(
        name="deb-seed",
        image="debian",
        networks=(Network(),),
        cloud_init=CloudInit(user_data=SEED, meta_data={"pyqvm-test": "yes"}),
        ready_timeout=300,
    )
    async with AsyncVM(spec) as vm:
        status = await vm.run(["cloud-init", "status", "--wait", "--long"], timeout=240)
        print(status.stdout_text)
        sh = "hostname; cat /etc/pyqvm-seed.txt /run/pyqvm-runcmd; cloud-init query ds.meta_data"
        out = (await vm.run(["sh", "-c", sh], check=True)).stdout_text
        assert out.startswith("seeded\nfrom the seed\nran\n"), out
        assert '"pyqvm-test": "yes"' in out and '"instance-id": "pyqvm-deb-seed-' in out, out
        # It came from the seed volume pyqvm attached, labelled cidata.
        label = await vm.run(["blkid", "-s", "LABEL", "-o", "value", "/dev/vdb"], check=True)
        assert label.stdout_text == "cidata\n"


@pytest.mark.asyncio
async def test_the_debian_disk_boots_from_firmware_through_a_bootloader(
    debian_image: image.GuestImage,
) -> None:
    """No -kernel: OVMF finds systemd-boot on the boot disk's EFI system partition, which
    loads the kernel and initrd from it and mounts the root disk by its label."""
    assert debian_image.boot_disk is not None
    spec = VMSpec(
        name="deb-uefi",
        firmware="ovmf",  # the build QEMU's firmware descriptors name
        disks=(Disk(path=debian_image.boot_disk), Disk(path=debian_image.disk)),
        networks=(Network(),),
        ready="agent",
        ready_timeout=300,
    )
    async with AsyncVM(spec) as vm:
        assert "-kernel" not in vm.argv and vm.machine.resolved_spec.effective_machine == "q35"
        state = await vm.run(["systemctl", "is-system-running", "--wait"], timeout=240)
        failed = await vm.run(["systemctl", "--failed", "--no-legend", "--plain"])
        print(f"uefi: {state.stdout_text.strip()}; failed units: {failed.stdout_text!r}")
        assert state.stdout_text.strip() in ("running", "degraded"), failed.stdout_text
        sh = "test -d /sys/firmware/efi && echo efi; cat /proc/cmdline; findmnt -no SOURCE /"
        out = (await vm.run(["sh", "-c", sh], check=True)).stdout_text.splitlines()
        assert out[0] == "efi"
        assert out[1].startswith("initrd=\\initrd.img root=LABEL=pyqvm-root"), out  # systemd-boot's
        assert out[2] == "/dev/vdb", out


@pytest.mark.asyncio
async def test_the_aarch64_debian_flavour_reaches_a_running_system() -> None:
    """The flavour for arm64, bootstrapped the same way in an aarch64 helper guest, boots
    to a running systemd under full emulation (the virt machine, UEFI firmware)."""
    img = await asyncio.to_thread(imagebuild.build, "debian", arch="aarch64")
    assert img.arch == "aarch64"
    spec = VMSpec(name="deb-arm", arch="aarch64", image="debian", ready_timeout=600)
    async with AsyncVM(spec) as vm:
        state = await vm.run(["systemctl", "is-system-running", "--wait"], timeout=600)
        failed = await vm.run(["systemctl", "--failed", "--no-legend", "--plain"])
        print(f"aarch64: {state.stdout_text.strip()}; failed units: {failed.stdout_text!r}")
        assert state.stdout_text.strip() in ("running", "degraded"), failed.stdout_text
        sh = "cat /proc/1/comm; dpkg --print-architecture; uname -m"
        out = (await vm.run(["sh", "-c", sh], check=True)).stdout_text
        assert out == "systemd\narm64\naarch64\n", out
