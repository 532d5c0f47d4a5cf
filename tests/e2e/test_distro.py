"""The ``debian`` flavour: a real Debian 12 system (systemd, udev, qemu-guest-agent,
cloud-init) built with mmdebstrap, booted in both device profiles."""

from __future__ import annotations

import pytest

from pyqvm import AsyncVM, Network, VMSpec, image

pytestmark = [pytest.mark.e2e, pytest.mark.distro]


@pytest.fixture(scope="session")
def debian_image() -> image.GuestImage:
    return image.build("debian")


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
