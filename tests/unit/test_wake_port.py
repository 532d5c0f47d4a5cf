"""The pyqvm-wake port: every launch of an image that runs the helper has it (a template and
its clones must have the same devices), including a spec made concrete from that image."""

from __future__ import annotations

import json
from pathlib import Path

from fuzz_values import fake_bzimage

from pyqvm import KernelBoot, VMSpec
from pyqvm.argv.build import WAKE_PORT_NAME
from pyqvm.image import guest
from pyqvm.launch.plan import preview_argv
from pyqvm.launch.resolve import with_image


def fake_image(cache: Path, flavour: str, kind: str, *, wake: bool = True) -> Path:
    d = cache / "images" / f"{flavour}-0123456789abcdef"
    d.mkdir(parents=True)
    fake_bzimage(d / "vmlinuz")
    for name in ("initrd.img", "disk.qcow2"):
        (d / name).write_bytes(b"x")
    manifest = {
        "format": guest.MANIFEST_FORMAT,
        "flavour": flavour,
        "kernel": "vmlinuz",
        "bzimage": "vmlinuz",
        "initrd": "initrd.img",
        "disk": "disk.qcow2",
        "kernel_version": "6.1.0-57-cloud-amd64",
        "ready_marker": "" if kind == "distro" else guest.READY_MARKER,
        "kind": kind,
        "wake_port": wake,
    }
    (d / guest.MANIFEST).write_text(json.dumps(manifest))
    return d


def wake_ports(argv: list[str]) -> list[str]:
    return [a for a in argv if WAKE_PORT_NAME in a]


def test_the_built_in_guest_and_its_concrete_spec_have_the_port(tmp_path: Path) -> None:
    fake_image(tmp_path, "default", "busybox")
    spec = VMSpec(image="default")
    argv = preview_argv(spec, image_cache=tmp_path)
    [port] = wake_ports(argv)
    assert json.loads(port)["bus"] == "pq-vser.0"
    assert "socket,id=pq-wake,fd=6" in argv
    # A clone's or a restored VM's spec names the image's kernel instead of the image.
    concrete = with_image(spec, tmp_path)
    assert concrete.image is None and concrete.kernel is not None
    assert wake_ports(preview_argv(concrete, image_cache=tmp_path)) == [port]


def test_the_debian_flavour_has_it_and_other_guests_do_not(tmp_path: Path) -> None:
    fake_image(tmp_path, "debian", "distro")
    fake_image(tmp_path, "full", "busybox", wake=False)  # built before the helper was a daemon
    assert len(wake_ports(preview_argv(VMSpec(image="debian"), image_cache=tmp_path))) == 1
    assert wake_ports(preview_argv(VMSpec(image="full"), image_cache=tmp_path)) == []
    (tmp_path / "own").mkdir()
    kernel = fake_bzimage(tmp_path / "own" / "vmlinuz")
    assert wake_ports(preview_argv(VMSpec(kernel=KernelBoot(kernel=kernel)))) == []
    # Without the agent there is no virtio-serial bus, and nothing to wake a clone through.
    fake_image(tmp_path, "default", "busybox")
    spec = VMSpec(image="default", guest_agent=False, ready="none")
    assert wake_ports(preview_argv(spec, image_cache=tmp_path)) == []
