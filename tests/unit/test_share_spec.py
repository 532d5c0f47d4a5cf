"""Shared folders without a guest: the spec's checks, the transport choice, argv, the CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pyqvm.argv import LaunchContext, build_argv
from pyqvm.cli import main
from pyqvm.errors import HostError, SpecError
from pyqvm.launch.virtiofs import VirtiofsdStatus, choose_transports, virtiofsd_argv
from pyqvm.ops.migration import migration_blocker
from pyqvm.spec import KernelBoot, VMSpec
from pyqvm.spec.io import spec_from_dict
from pyqvm.spec.shares import Share, cmdline_entries

USABLE = VirtiofsdStatus(Path("/usr/lib/qemu/virtiofsd"), True, "a fake, usable")
UNUSABLE = VirtiofsdStatus(Path("/usr/lib/qemu/virtiofsd"), False, "runs as root only")


def test_defaults_fill_tag_and_guest_path(tmp_path: Path) -> None:
    spec = VMSpec(shares=(Share(tmp_path), Share(tmp_path, tag="src", readonly=True)))
    assert [(s.tag, s.guest, s.readonly) for s in spec.shares] == [
        ("share0", "/mnt/share0", False),
        ("src", "/mnt/src", True),
    ]
    assert spec.shares[0].host == tmp_path and spec.shares[0].transport == "auto"


@pytest.mark.parametrize(
    ("share", "field", "words"),
    [
        ({"host": "missing"}, "shares[0].host", "no such directory"),
        ({"host": "file.txt"}, "shares[0].host", "is a file, not a directory"),
        ({"host": ".", "tag": "a b"}, "shares[0].tag", "not a mount tag"),
        ({"host": ".", "tag": "x" * 32}, "shares[0].tag", "not a mount tag"),
        ({"host": ".", "guest": "mnt/src"}, "shares[0].guest", "not an absolute path"),
        ({"host": ".", "guest": "/mnt/../etc"}, "shares[0].guest", "not an absolute path"),
        ({"host": ".", "guest": "/"}, "shares[0].guest", "not an absolute path"),
        ({"host": ".", "guest": "/mnt/a b"}, "shares[0].guest", "kernel command line"),
        ({"host": ".", "guest": "/mnt/a,b"}, "shares[0].guest", "kernel command line"),
        ({"host": ".", "guest": "/proc/x"}, "shares[0].guest", "under /proc"),
        ({"host": ".", "readonly": "yes"}, "shares[0].readonly", "true or false"),
        ({"host": ".", "transport": "nfs"}, "shares[0].transport", "virtiofs"),
    ],
)
def test_bad_shares_name_the_field(
    tmp_path: Path, share: dict[str, object], field: str, words: str
) -> None:
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SpecError, match=words) as e:
        spec_from_dict({"shares": [share]}, base_dir=tmp_path)
    assert e.value.field == field


def test_two_shares_cannot_take_one_tag_or_one_path(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="tag of shares\\[0\\]") as e:
        VMSpec(shares=(Share(tmp_path, tag="a"), Share(tmp_path, tag="a", guest="/b")))
    assert e.value.field == "shares[1].tag"
    with pytest.raises(SpecError, match="mounted on '/x' already") as e:
        VMSpec(shares=(Share(tmp_path, guest="/x"), Share(tmp_path, guest="/x")))
    assert e.value.field == "shares[1].guest"


def test_9p_is_refused_on_the_default_image(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="default image's kernel has no 9p") as e:
        VMSpec(image="default", shares=(Share(tmp_path, transport="9p"),))
    assert e.value.field == "shares[0].transport"
    VMSpec(image="full", shares=(Share(tmp_path, transport="9p"),))


def test_auto_is_virtiofs_where_virtiofsd_runs_else_9p(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    full = VMSpec(image="full", shares=(Share(tmp_path),))
    assert choose_transports(full, USABLE).shares[0].transport == "virtiofs"
    caplog.set_level(logging.INFO, "pyqvm.launch.virtiofs")
    assert choose_transports(full, UNUSABLE).shares[0].transport == "9p"
    assert "9p, as virtiofs cannot be used: runs as root only" in caplog.text
    default = VMSpec(image="default", shares=(Share(tmp_path),))
    with pytest.raises(HostError, match='no 9p: use image = "full"'):
        choose_transports(default, UNUSABLE)
    asked = VMSpec(image="full", shares=(Share(tmp_path, transport="virtiofs"),))
    with pytest.raises(HostError, match=r'shares\[0\].transport: "virtiofs" cannot be used'):
        choose_transports(asked, UNUSABLE)


def _ctx(tmp_path: Path, sockets: dict[str, Path]) -> LaunchContext:
    return LaunchContext(
        qemu=Path("/usr/bin/qemu-system-x86_64"),
        accel="tcg",
        qmp_fd=5,
        agent_fd=6,
        console_log=tmp_path / "console.log",
        share_sockets=sockets,
    )


def _kernel(tmp_path: Path) -> KernelBoot:
    (tmp_path / "vmlinuz").write_bytes(b"")
    return KernelBoot(kernel=tmp_path / "vmlinuz")


def test_virtiofs_argv(tmp_path: Path) -> None:
    share = Share(tmp_path, tag="src", transport="virtiofs")
    for machine, driver in (("microvm", "vhost-user-fs-device"), ("q35", "vhost-user-fs-pci")):
        spec = VMSpec(kernel=_kernel(tmp_path), machine=machine, shares=(share,))  # type: ignore[arg-type]
        argv = build_argv(spec, _ctx(tmp_path, {"src": tmp_path / "fs-src.sock"}))
        chardev = argv.index(f"socket,id=pq-fs0,path={tmp_path}/fs-src.sock")
        device = json.loads(argv[chardev + 2])
        assert device == {"driver": driver, "id": "pq-fsdev0", "chardev": "pq-fs0", "tag": "src"}
        ram = json.loads(argv[argv.index("-object") + 1])
        # virtiofsd maps the guest's RAM: it is a shared memfd.
        assert ram["qom-type"] == "memory-backend-memfd" and ram["share"] is True
        legacy_off = "virtio-mmio.force-legacy=false" in argv
        assert legacy_off == (machine == "microvm")


def test_9p_argv_escapes_the_path(tmp_path: Path) -> None:
    odd = tmp_path / "a,b"
    odd.mkdir()
    spec = VMSpec(
        kernel=_kernel(tmp_path),
        machine="q35",
        shares=(Share(odd, tag="src", transport="9p", readonly=True),),
    )
    argv = build_argv(spec, _ctx(tmp_path, {}))
    fsdev = argv[argv.index("-fsdev") + 1]
    assert fsdev == (
        f"local,id=pq-fs0,path={tmp_path}/a,,b,security_model=none,multidevs=remap,readonly=on"
    )
    device = json.loads(argv[argv.index("-fsdev") + 3])
    assert device == {
        "driver": "virtio-9p-pci",
        "id": "pq-fsdev0",
        "fsdev": "pq-fs0",
        "mount_tag": "src",
    }
    assert json.loads(argv[argv.index("-object") + 1])["qom-type"] == "memory-backend-ram"


def test_virtiofsd_argv_escapes_commas(tmp_path: Path) -> None:
    odd = tmp_path / "a,b\\c"
    odd.mkdir()
    argv = virtiofsd_argv(USABLE.path or Path(), Share(odd, tag="t"), tmp_path / "s.sock")
    assert f"source={tmp_path}/a\\,b\\\\c" in argv and f"--socket-path={tmp_path}/s.sock" in argv


def test_the_guest_learns_its_shares_from_the_command_line(tmp_path: Path) -> None:
    shares = VMSpec(shares=(Share(tmp_path, tag="src", guest="/work", readonly=True),)).shares
    with pytest.raises(ValueError, match="decide the transport"):
        cmdline_entries(shares)
    decided = choose_transports(VMSpec(image="full", shares=shares), USABLE).shares
    assert cmdline_entries(decided) == ["pyqvm.share=src,virtiofs,ro,/work"]


def test_shares_block_migration_and_snapshots(tmp_path: Path) -> None:
    reason = migration_blocker(VMSpec(name="vm1", shares=(Share(tmp_path, tag="src"),)))
    assert reason is not None and "VM 'vm1' has shared folders (src)" in reason
    assert migration_blocker(VMSpec()) is None


def test_the_share_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--share HOST[:GUEST][:ro]`` on the built-in guest: it reaches the kernel command line
    (the transport depends on this host's virtiofsd, so both are accepted)."""
    args = ["cmdline", "--json", "--accel", "tcg", "--image", "full"]
    assert main([*args, "--share", f"{tmp_path}:/work:ro", "--share", str(tmp_path)]) == 0
    argv = json.loads(capsys.readouterr().out)
    append = argv[argv.index("-append") + 1]
    assert any(f"pyqvm.share=share0,{t},ro,/work" in append for t in ("virtiofs", "9p"))
    assert any(f"pyqvm.share=share1,{t},rw,/mnt/share1" in append for t in ("virtiofs", "9p"))
    assert main(["cmdline", "--share", str(tmp_path / "nope")]) == 125
    assert "share.host): no such directory" in capsys.readouterr().err
