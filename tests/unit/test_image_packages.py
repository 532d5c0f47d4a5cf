"""The guest's extra Debian packages (dropbear and its libraries) and init's network and SSH
setup; nothing downloaded or booted (tests/e2e boot the real image)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pyqvm.arches import ARCHES
from pyqvm.image import builder, tools
from pyqvm.image.guest import FLAVOURS, cache_key
from pyqvm.image.modules import on_demand_modules, parse_module_list

INIT = builder.RECIPES / "init"


def inputs(arch: str = "x86_64", **versions: str) -> builder.BuildInputs:
    pkg = lambda name: tools.Package(name, versions.get(name, "1.0"), "amd64")  # noqa: E731
    return builder.BuildInputs(
        flavour="default",
        arch=ARCHES[arch],
        kernel=pkg("linux-image-6.1.0-57-cloud-amd64"),
        busybox=pkg("busybox-static"),
        packages=tuple(pkg(name) for name in builder.GUEST_PACKAGES),
        loader=pkg(builder.LOADER_PACKAGE),
        recipes={"init": "abc"},
    )


def test_dropbear_and_its_libraries_are_guest_packages() -> None:
    assert builder.GUEST_PACKAGES["dropbear-bin"] == ("usr/sbin/dropbear",)
    assert builder.GUEST_PACKAGES["qemu-guest-agent"] == ("usr/sbin/qemu-ga",)
    # Not on a stock host: they must come from their .debs.
    assert {"libtomcrypt1", "libtommath1"} <= set(builder.GUEST_PACKAGES)


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


def test_shared_libraries_searches_the_unpacked_debs_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[str, object] = {}

    def fake_run(argv: list[str], *, what: str, env: dict[str, str] | None = None) -> str:
        seen["env"] = env
        return "\tlibtomcrypt.so.1 => /x/usr/lib/libtomcrypt.so.1 (0x00007f)\n"

    monkeypatch.setattr(tools, "run", fake_run)
    libs = tools.shared_libraries(Path("dropbear"), library_dirs=[Path("/x/usr/lib"), Path("/y")])
    assert libs == [Path("/x/usr/lib/libtomcrypt.so.1")]
    assert seen["env"] == {"LD_LIBRARY_PATH": "/x/usr/lib:/y"}

    monkeypatch.setattr(tools, "run", lambda *a, **k: "\tlibtommath.so.1 => not found\n")
    with pytest.raises(tools.HostError, match="apt-get install -y dropbear-bin"):
        tools.shared_libraries(Path("dropbear"), package="dropbear-bin")


def test_packages_install_deb_libraries_at_their_package_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roots = {"dropbear-bin": tmp_path / "p/dropbear-bin", "libtomcrypt1": tmp_path / "p/libt"}
    exe = roots["dropbear-bin"] / "usr/sbin/dropbear"
    deb_lib = roots["libtomcrypt1"] / "usr/lib/x86_64-linux-gnu/libtomcrypt.so.1"
    host_lib = tmp_path / "host/lib/libz.so.1"
    for f in (exe, deb_lib, host_lib):
        f.parent.mkdir(parents=True)
        f.write_text(f.name)
    monkeypatch.setattr(
        builder, "GUEST_PACKAGES", {"dropbear-bin": ("usr/sbin/dropbear",), "libtomcrypt1": ()}
    )
    asked: list[tuple[Path, list[Path]]] = []

    def fake_libs(binary: Path, *, library_dirs: list[Path], package: str) -> list[Path]:
        asked.append((binary, list(library_dirs)))
        return [deb_lib, host_lib]

    monkeypatch.setattr(tools, "shared_libraries", fake_libs)
    initrd = tmp_path / "initrd"
    builder._packages(initrd, roots)
    assert asked == [(exe, [deb_lib.parent])]
    assert (initrd / "usr/sbin/dropbear").read_text() == "dropbear"
    assert (initrd / "usr/lib/x86_64-linux-gnu/libtomcrypt.so.1").read_text() == "libtomcrypt.so.1"
    assert (initrd / host_lib.relative_to("/")).is_file()  # a host library: its host path


def test_packages_refuse_a_package_without_its_executable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(builder, "GUEST_PACKAGES", {"dropbear-bin": ("usr/sbin/dropbear",)})
    (tmp_path / "p").mkdir()
    with pytest.raises(builder.ImageError, match="dropbear-bin package has no usr/sbin/dropbear"):
        builder._packages(tmp_path / "initrd", {"dropbear-bin": tmp_path / "p"})


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


USER_ON = lambda nic: [  # noqa: E731
    f"ip addr add 10.0.2.15/24 dev {nic}",
    f"ip link set {nic} up",
    "ip route add default via 10.0.2.2",
]


def test_user_network_on_the_first_nic_without_entries(tmp_path: Path) -> None:
    assert run_network(tmp_path, "quiet") == ["ip link set lo up", *USER_ON("eth0")]


def test_a_claimed_first_nic_moves_user_networking_to_the_next(tmp_path: Path) -> None:
    out = run_network(tmp_path, "quiet pyqvm.ip=52:54:00:12:34:56,10.9.0.5/24 x=1")
    assert out == [
        "ip link set lo up",
        "ip addr add 10.9.0.5/24 dev eth0",
        "ip link set eth0 up",
        *USER_ON("eth1"),
    ]


def test_mac_match_ignores_case(tmp_path: Path) -> None:
    out = run_network(tmp_path, "pyqvm.ip=52:54:0A:C8:07:02,10.200.7.2/24")
    assert out[1:3] == ["ip addr add 10.200.7.2/24 dev eth1", "ip link set eth1 up"]
    assert out[3:] == USER_ON("eth0")


def test_every_nic_claimed_means_no_user_network(tmp_path: Path) -> None:
    out = run_network(
        tmp_path, "pyqvm.ip=52:54:00:12:34:56,10.9.0.5/24 pyqvm.ip=52:54:0a:c8:07:02,10.9.1.5/24"
    )
    assert not any("10.0.2" in line for line in out)
    assert "ip addr add 10.9.1.5/24 dev eth1" in out


def test_an_entry_for_no_nic_is_reported(tmp_path: Path) -> None:
    out = run_network(tmp_path, "pyqvm.ip=aa:bb:cc:dd:ee:ff,1.2.3.4/8")
    assert "pyqvm: cannot set up pyqvm.ip=aa:bb:cc:dd:ee:ff,1.2.3.4/8 (no such NIC?)" in out
    assert out[-3:] == USER_ON("eth0")


def test_init_names_the_ssh_interface_pyqvm_documents() -> None:
    text = INIT.read_text()
    assert '*" pyqvm.ssh=1 "*' in text
    for name in ("opt/pyqvm/ssh/host_key/raw", "opt/pyqvm/ssh/authorized_keys/raw"):
        leaf = name.rsplit("/", 2)
        assert f"$k/{leaf[-2]}/raw" in text
    assert "k=/sys/firmware/qemu_fw_cfg/by_name/opt/pyqvm/ssh" in text
    # readiness waits for the listening socket, before the agent starts
    assert text.index(":0016 00000000:0000 0A") < text.index("start-agent")
