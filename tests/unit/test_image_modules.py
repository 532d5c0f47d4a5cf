"""Module selection for the initramfs: modules.dep, modules.builtin, the recipe list."""

from __future__ import annotations

from pyqvm.image.modules import (
    boot_modules,
    module_name,
    parse_module_list,
    parse_modules_alias,
    parse_modules_builtin,
    parse_modules_dep,
    plan_modules,
)

MODULES_DEP = """\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko \
kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_ring.ko \
kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko \
kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/virtio/virtio.ko
""".replace("\\\n", "")

MODULES_BUILTIN = "kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n"


def test_module_name_normalises() -> None:
    assert module_name("kernel/drivers/char/hw_random/virtio-rng.ko.xz") == "virtio_rng"
    assert module_name("kernel/fs/ext4/ext4.ko.zst") == "ext4"
    assert module_name("virtio-net") == "virtio_net"


def test_plan_orders_dependencies_first_and_sorts_out_the_rest() -> None:
    deps = parse_modules_dep(MODULES_DEP)
    builtin = parse_modules_builtin(MODULES_BUILTIN)
    plan = plan_modules(["virtio_net", "virtio-rng", "ext4", "e1000", "virtio_pci"], deps, builtin)
    assert plan.load == ("virtio_net", "virtio_rng", "virtio_pci")
    assert plan.builtin == ("ext4",)
    assert plan.missing == ("e1000",)
    files = plan.files
    assert len(files) == len(set(files))
    for path, needs in deps.items():
        if path in files:
            assert all(files.index(d) < files.index(path) for d in needs)
    assert "kernel/drivers/char/hw_random/virtio-rng.ko.xz" in files
    assert set(files) == set(deps)  # every sample module is needed by a wanted one


def test_plan_survives_a_dependency_cycle() -> None:
    deps = {"a.ko": ("b.ko",), "b.ko": ("a.ko",)}
    plan = plan_modules(["a"], deps, frozenset())
    assert set(plan.files) == {"a.ko", "b.ko"}


def test_recipe_list_by_flavour() -> None:
    text = """\
# comment
virtio_pci
virtio-rng        # trailing comment
e1000   full
special other full
virtio_pci
"""
    assert parse_module_list(text, "default") == ("virtio_pci", "virtio_rng")
    assert parse_module_list(text, "full") == ("virtio_pci", "virtio_rng", "e1000", "special")


MODULES_ALIAS = """\
# Aliases extracted from modules themselves.
alias fs-virtiofs virtiofs
alias virtio:d0000001Av* virtiofs
alias acpi*:LNRO0005:* virtio_mmio
alias of:N*T*Cvirtio,mmio virtio_mmio
alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci
alias virtio:d00000002v* virtio_blk
alias scsi:t-0x00* sd_mod
alias block-major-8-* sd_mod
alias devname:fuse fuse
alias acpi*:QEMU0002:* qemu_fw_cfg
alias platform:odd$(x) odd
"""


def test_boot_modules_sorts_device_drivers_from_the_rest() -> None:
    aliases = parse_modules_alias(MODULES_ALIAS)
    assert aliases[0] == ("fs-virtiofs", "virtiofs")
    boot = boot_modules(["virtio_mmio", "virtio_pci", "virtio_blk", "sd_mod", "libata"], aliases)
    assert boot.drivers == (
        ("acpi*:LNRO0005:*", "virtio_mmio"),
        ("of:N*T*Cvirtio,mmio", "virtio_mmio"),
        ("pci:v00001AF4d*sv*sd*bc*sc*i*", "virtio_pci"),
        ("virtio:d00000002v*", "virtio_blk"),
        ("scsi:t-0x00*", "sd_mod"),  # not block-major-8-*: that names no device
    )
    # No device alias: loaded at every boot.
    assert boot.always == ("libata",)


def test_boot_modules_leaves_out_modules_not_loaded_at_boot_and_unsafe_patterns() -> None:
    aliases = parse_modules_alias(MODULES_ALIAS)
    boot = boot_modules(["virtio_blk", "odd"], aliases)
    # qemu_fw_cfg and virtiofs are not asked for (on demand); odd's pattern is not one init
    # puts in a shell `case` as it is: odd loads at every boot instead.
    assert boot.drivers == (("virtio:d00000002v*", "virtio_blk"),)
    assert boot.always == ("odd",)
