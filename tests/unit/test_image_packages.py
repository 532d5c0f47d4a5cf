"""The guest's extra Debian packages (dropbear and its libraries) and init's network and SSH
setup; nothing downloaded or booted (tests/e2e boot the real image)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pyqvm.errors import ImageError
from pyqvm.image import builder
from pyqvm.image.archive import Package
from pyqvm.image.guest import FLAVOURS, cache_key
from pyqvm.image.modules import on_demand_modules, parse_module_list
from pyqvm.spec.arches import ARCHES

INIT = builder.RECIPES / "init"


def inputs(arch: str = "x86_64", **versions: str) -> builder.BuildInputs:
    def pkg(name: str) -> Package:
        version = versions.get(name, "1.0")
        return Package(name, version, "amd64", f"pool/{name}.deb", "0" * 64, 1, "file:///m")

    return builder.BuildInputs(
        flavour="default",
        arch=ARCHES[arch],
        kernel=pkg("linux-image-6.1.0-57-cloud-amd64"),
        busybox=pkg("busybox-static"),
        packages=tuple(pkg(name) for name in builder.GUEST_PACKAGES),
        loader=pkg(builder.LOADER_PACKAGE),
        recipes={"init": "abc"},
    )


def test_dropbear_and_the_agent_are_guest_packages() -> None:
    assert builder.GUEST_PACKAGES == {
        "qemu-guest-agent": ("usr/sbin/qemu-ga",),
        "dropbear-bin": ("usr/sbin/dropbear",),
    }


def test_each_package_version_is_a_cache_input() -> None:
    base = inputs()
    assert base.as_dict()["dropbear-bin"] == "dropbear-bin=1.0"
    assert base.as_dict()["qemu-guest-agent"] == "qemu-guest-agent=1.0"
    for name in (*builder.GUEST_PACKAGES, builder.LOADER_PACKAGE):
        assert cache_key(inputs(**{name: "2.0"}).as_dict()) != cache_key(base.as_dict())
    # An aarch64 image of the same package versions is another image.
    assert cache_key(inputs("aarch64").as_dict()) != cache_key(base.as_dict())


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_fw_cfg_module_is_packed_on_demand(flavour: str) -> None:
    listed = (builder.RECIPES / "modules.txt").read_text()
    assert "qemu_fw_cfg" in parse_module_list(listed, flavour)
    assert "qemu_fw_cfg" in on_demand_modules(listed, flavour)


HOST_TRUE = Path("/usr/bin/true")  # a dynamic x86_64 program of Debian 12: libc, ld.so
TRIPLET = "x86_64-linux-gnu"


def unpacked_libc(root: Path) -> None:
    """A libc6 package as it unpacks: libc in /lib/<triplet>, ld.so behind /lib64's link."""
    libdir = root / "lib" / TRIPLET
    libdir.mkdir(parents=True)
    for name in ("libc.so.6", "ld-linux-x86-64.so.2"):
        shutil.copyfile(Path("/lib") / TRIPLET / name, libdir / name)
    (root / "lib64").mkdir()
    (root / "lib64/ld-linux-x86-64.so.2").symlink_to(f"/lib/{TRIPLET}/ld-linux-x86-64.so.2")


def test_packages_take_every_library_from_the_unpacked_debs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roots = {"prog": tmp_path / "p/prog", "lib:libc6": tmp_path / "p/libc6"}
    (roots["prog"] / "usr/sbin").mkdir(parents=True)
    shutil.copyfile(HOST_TRUE, roots["prog"] / "usr/sbin/prog")
    unpacked_libc(roots["lib:libc6"])
    monkeypatch.setattr(builder, "GUEST_PACKAGES", {"prog": ("usr/sbin/prog",)})
    initrd = tmp_path / "initrd"
    builder._packages(initrd, roots, ARCHES["x86_64"])
    assert (initrd / "usr/sbin/prog").read_bytes() == HOST_TRUE.read_bytes()
    libc = roots["lib:libc6"] / "lib" / TRIPLET / "libc.so.6"
    assert (initrd / "lib" / TRIPLET / "libc.so.6").read_bytes() == libc.read_bytes()
    # the interpreter at the path the program names, a file (the link resolved in its root)
    interp = initrd / "lib64/ld-linux-x86-64.so.2"
    assert interp.is_file() and not interp.is_symlink()


def test_packages_refuse_a_library_no_deb_has(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roots = {"prog": tmp_path / "p/prog"}
    (roots["prog"] / "usr/sbin").mkdir(parents=True)
    shutil.copyfile(HOST_TRUE, roots["prog"] / "usr/sbin/prog")
    monkeypatch.setattr(builder, "GUEST_PACKAGES", {"prog": ("usr/sbin/prog",)})
    with pytest.raises(ImageError, match=r"no amd64 package .* has libc\.so\.6"):
        builder._packages(tmp_path / "initrd", roots, ARCHES["x86_64"])


def test_packages_refuse_a_package_without_its_executable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(builder, "GUEST_PACKAGES", {"dropbear-bin": ("usr/sbin/dropbear",)})
    (tmp_path / "p").mkdir()
    with pytest.raises(ImageError, match="dropbear-bin package has no usr/sbin/dropbear"):
        builder._packages(tmp_path / "initrd", {"dropbear-bin": tmp_path / "p"}, ARCHES["x86_64"])


# -- init's network setup, run by the host's sh over a fake /sys/class/net ------------------

NICS = {"eth0": "52:54:00:12:34:56", "eth1": "52:54:0a:c8:07:02"}


def network_part(sysnet: Path) -> str:
    text = INIT.read_text()
    start = text.index("# Private networks")
    end = text.index('echo "nameserver', start)  # not the resolv.conf write: it is the host's
    part = text[start:end]
    assert "/etc" not in part and "/sys/class/net" in part
    return part.replace("/sys/class/net", str(sysnet)).replace("/dev/console", "/dev/stderr")


def run_network(tmp_path: Path, cmdline: str, nics: dict[str, str] = NICS) -> list[str]:
    sysnet = tmp_path / "net"
    shutil.rmtree(sysnet, ignore_errors=True)
    for name, mac in {"lo": "00:00:00:00:00:00", **nics}.items():
        (sysnet / name).mkdir(parents=True)
        (sysnet / name / "address").write_text(mac + "\n")
        if name != "lo":
            (sysnet / name / "device").mkdir()
    script = f'ip() {{ echo "ip $*"; }}\ncmdline="{cmdline}"\n'
    proc = subprocess.run(
        ["sh", "-c", script + network_part(sysnet)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=True,
    )  # fmt: skip
    return proc.stdout.splitlines()


def user_on(nic: str) -> list[str]:
    return [
        f"ip addr add 10.0.2.15/24 dev {nic}",
        f"ip link set {nic} up",
        "ip route add default via 10.0.2.2",
    ]


def test_user_network_on_the_first_nic_without_entries(tmp_path: Path) -> None:
    assert run_network(tmp_path, "quiet") == ["ip link set lo up", *user_on("eth0")]


def test_a_claimed_first_nic_moves_user_networking_to_the_next(tmp_path: Path) -> None:
    out = run_network(tmp_path, "quiet pyqvm.ip=52:54:00:12:34:56,10.9.0.5/24 x=1")
    assert out == [
        "ip link set lo up",
        "ip addr add 10.9.0.5/24 dev eth0",
        "ip link set eth0 up",
        *user_on("eth1"),
    ]


def test_mac_match_ignores_case(tmp_path: Path) -> None:
    out = run_network(tmp_path, "pyqvm.ip=52:54:0A:C8:07:02,10.200.7.2/24")
    assert out[1:3] == ["ip addr add 10.200.7.2/24 dev eth1", "ip link set eth1 up"]
    assert out[3:] == user_on("eth0")


def test_every_nic_claimed_means_no_user_network(tmp_path: Path) -> None:
    out = run_network(
        tmp_path, "pyqvm.ip=52:54:00:12:34:56,10.9.0.5/24 pyqvm.ip=52:54:0a:c8:07:02,10.9.1.5/24"
    )
    assert not any("10.0.2" in line for line in out)
    assert "ip addr add 10.9.1.5/24 dev eth1" in out


def test_an_entry_for_no_nic_is_reported(tmp_path: Path) -> None:
    out = run_network(tmp_path, "pyqvm.ip=aa:bb:cc:dd:ee:ff,1.2.3.4/8")
    assert "pyqvm: cannot set up pyqvm.ip=aa:bb:cc:dd:ee:ff,1.2.3.4/8 (no such NIC?)" in out
    assert out[-3:] == user_on("eth0")


def test_init_names_the_ssh_interface_pyqvm_documents() -> None:
    text = INIT.read_text()
    assert '*" pyqvm.ssh=1 "*' in text
    for name in ("opt/pyqvm/ssh/host_key/raw", "opt/pyqvm/ssh/authorized_keys/raw"):
        leaf = name.rsplit("/", 2)
        assert f"$k/{leaf[-2]}/raw" in text
    assert "k=/sys/firmware/qemu_fw_cfg/by_name/opt/pyqvm/ssh" in text
    # readiness waits for the listening socket, before the agent starts
    assert text.index(":0016 00000000:0000 0A") < text.index("start-agent")
