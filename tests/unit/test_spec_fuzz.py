r"""Hostile spec values, fuzzed (issue 12, item 2), without QEMU.

The property, for every field: building the spec (``VMSpec(...)``, ``spec_from_dict``,
``load_spec``) either raises `SpecError` whose ``field`` names the field, or succeeds, and then
the argv `preview_argv` gives has the value only where it belongs, escaped (``,,`` in
``key=value`` options) or inside JSON, with exactly the options and keys a benign value gives
(no injected option, no ``key=value`` split out of a value), and can be handed to execve.
Never another exception type.

The bugs this fuzzing found are fixed; each keeps a test with its minimal input at the end
of this file. The classes of values they were about (`fuzz_values.qemu_refuses_disk_id`,
``qemu_refuses_device_id``, ``slirp_misreads``) are now asserted refused with a `SpecError`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import pwd
import re
import struct
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from fuzz_values import (
    ID_RULE,
    NAME_RULE,
    addresses,
    assert_launchable,
    fake_bzimage,
    file_names,
    hostile_text,
    hostile_text_any,
    ids,
    ids_are_unique,
    json_args,
    keyvalue,
    macs,
    plain_args,
    qemu_refuses_device_id,
    qemu_refuses_disk_id,
    shape,
    slirp_misreads,
    unicast_mac,
    unrepresentable,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pyqvm.argv import DiskFile, LaunchContext, build_argv
from pyqvm.errors import SpecError
from pyqvm.host.facts import read_host_facts
from pyqvm.launch.plan import preview_argv
from pyqvm.spec import (
    Disk,
    HostDevice,
    KernelBoot,
    Network,
    PortForward,
    VMSpec,
)
from pyqvm.spec.io import load_spec, spec_from_dict

FUZZ = settings(
    max_examples=150,
    deadline=None,  # the machine may be busy; time is bounded by the example counts
    database=None,  # no .hypothesis/ directory in the work tree
    suppress_health_check=[HealthCheck.too_slow],
)
FEW = settings(FUZZ, max_examples=100)
MANY = settings(FUZZ, max_examples=300)

_count = itertools.count()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def fresh(work: Path) -> Path:
    """A new empty directory for one example."""
    d = work / f"e{next(_count)}"
    d.mkdir()
    return d


def building(make: typing.Callable[[], VMSpec]) -> VMSpec | SpecError | None:
    """``make()``: the spec, or its SpecError (any other exception fails the test)."""
    try:
        return make()
    except SpecError as e:
        assert isinstance(e.field, str)
        assert str(e) == (f"{e.field}: {e.message}" if e.field else e.message)
        return e


def argv_of(spec: VMSpec) -> list[str]:
    """The argv pyqvm would run (`preview_argv`); with host devices, which this host lacks,
    `build_argv` with a stand-in launch context as tests/unit/test_argv.py does."""
    if not spec.host_devices:
        argv = preview_argv(spec)
    else:
        ctx = LaunchContext(
            qemu=Path("/usr/bin/qemu-system-x86_64"),
            accel="tcg",
            qmp_fd=3,
            agent_fd=4 if spec.guest_agent else None,
            console_log=spec.serial_log or Path("/run/console.log"),
            disk_files={d.id: DiskFile(Path(f"/run/{d.id}.qcow2")) for d in spec.disks},
        )
        argv = build_argv(spec, ctx)
    # extra_args go last, verbatim (docs/spec.md): the rest is pyqvm's and is read as QEMU does.
    n = len(spec.extra_args)
    assert tuple(argv[len(argv) - n :]) == spec.extra_args
    core = argv[: len(argv) - n]
    assert_launchable(core)
    ids_are_unique(core)
    return core


def field_of(err: SpecError, *accepted: str) -> None:
    assert err.field in accepted, f"{err.field!r} is not one of {accepted}: {err}"


def raw_file(path: Path, qcow2: bool = False) -> Path:
    path.write_bytes((b"QFI\xfb" if qcow2 else b"\0\0\0\0") + b"\0" * 508)
    return path


# --- names -------------------------------------------------------------------------------------


@FUZZ
@given(
    name=st.one_of(hostile_text, st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,70}", fullmatch=True))
)
def test_name(name: str) -> None:
    got = building(lambda: VMSpec(name=name, guest_agent=False))
    if isinstance(got, SpecError):
        field_of(got, "name")
        assert not NAME_RULE.fullmatch(name)
        return
    assert got is not None and NAME_RULE.fullmatch(name)
    argv = argv_of(got)
    assert shape(argv) == shape(argv_of(VMSpec(name="benign", guest_agent=False)))
    (arg,) = plain_args(argv, "-name")
    assert keyvalue(arg) == (name, {"process": f"pyqvm-{name}"})


# --- paths ---------------------------------------------------------------------------------------

PATH_FIELDS = ["disk", "disk-ephemeral", "cdrom", "kernel", "initrd", "ovmf_code", "serial_log"]
#: Where a missing path is reported, through VMSpec(...) / through spec_from_dict.
PATH_ERROR_FIELDS = {
    "disk": ("disk.path", "disks[0].path"),
    "disk-ephemeral": ("disk.path", "disks[0].path"),
    "cdrom": ("cdroms[0]",),
    "kernel": ("kernel.kernel",),
    "initrd": ("kernel.initrd",),
    "ovmf_code": ("ovmf_code",),
    "serial_log": ("serial_log",),
}


def path_spec(field: str, path: Path, helper: Path, *, as_data: bool = False) -> VMSpec:
    """A spec whose ``field`` is ``path`` (``helper``: an existing kernel for the others).

    ``as_data``: built with `spec_from_dict` from the path's string (relative to its dir).
    """
    base: dict[str, Any] = {"guest_agent": False, "machine": "q35"}
    value: Any = path.name if as_data else path
    if field in ("disk", "disk-ephemeral"):
        eph = field == "disk-ephemeral"
        base["disks"] = [{"path": value, "format": "raw", "ephemeral": eph}]
    elif field == "cdrom":
        base["cdroms"] = [value]
    elif field == "kernel":
        base["kernel"] = {"kernel": value}
    elif field == "initrd":
        base["kernel"] = {"kernel": str(helper), "initrd": value}
    elif field == "ovmf_code":
        base |= {"firmware": "ovmf", "ovmf_code": value}
    else:
        base["serial_log"] = value
    if as_data:
        return spec_from_dict(base, base_dir=path.parent)
    if "disks" in base:
        base["disks"] = [Disk(**d) for d in base["disks"]]
    if "kernel" in base:
        base["kernel"] = KernelBoot(**base["kernel"])
    return VMSpec(**base)


def where_path_goes(field: str, argv: list[str]) -> str:
    """The one place of the argv the path field's value reaches, decoded as QEMU decodes it."""
    if field == "disk":
        return str(json_args(argv, "-blockdev")[0]["file"]["filename"])
    if field == "disk-ephemeral":
        return str(json_args(argv, "-blockdev")[0]["backing"]["file"]["filename"])
    if field == "cdrom":
        return str(json_args(argv, "-blockdev")[0]["file"]["filename"])
    if field == "kernel":
        return plain_args(argv, "-kernel")[0]
    if field == "initrd":
        return plain_args(argv, "-initrd")[0]
    if field == "ovmf_code":
        return str(json_args(argv, "-blockdev")[0]["filename"])
    chardevs = [keyvalue(a) for a in plain_args(argv, "-chardev")]
    (console,) = [kv for _, kv in chardevs if kv.get("id") == "pq-console"]
    return console["logfile"]


def make_path(field: str, path: Path) -> None:
    if field in ("kernel",):
        fake_bzimage(path)
    elif field != "serial_log":
        raw_file(path)


@pytest.mark.parametrize("field", PATH_FIELDS)
@FUZZ
@given(name=file_names, data=st.booleans())
def test_hostile_file_names(work: Path, field: str, name: str, data: bool) -> None:
    """A file with a hostile name is passed literally, in its one place, and injects nothing."""
    d = fresh(work)
    kernel = fake_bzimage(d / "helper-kernel")
    path = d / name
    make_path(field, path)
    if data and name.startswith("~"):
        event("relative ~name: expanded (see test_tilde_paths)")
        data = False
    spec = building(lambda: path_spec(field, path, kernel, as_data=data))
    assert isinstance(spec, VMSpec), f"{field} = {str(path)!r} refused: {spec}"
    argv = argv_of(spec)
    plain = d / "plain"
    make_path(field, plain)
    assert shape(argv) == shape(argv_of(path_spec(field, plain, kernel)))
    assert where_path_goes(field, argv) == str(path)
    assert argv.count(str(path)) == (1 if field in ("kernel", "initrd") else 0)


@pytest.mark.parametrize("field", [f for f in PATH_FIELDS if f != "serial_log"])
@FEW
@given(name=file_names, how=st.sampled_from(["absent", "no-dir", "is-dir", "dangling"]))
def test_missing_paths_are_spec_errors(work: Path, field: str, name: str, how: str) -> None:
    """A path that must exist and does not (or is a directory) is a SpecError on its field,
    when the spec is built, before anything runs."""
    d = fresh(work)
    kernel = fake_bzimage(d / "helper-kernel")
    path = d / name
    if how == "no-dir":
        path = d / "no-such-dir" / name
    elif how == "is-dir":
        path.mkdir()
    elif how == "dangling":
        path.symlink_to(d / "nowhere")
    for data in (False, True):
        if data and (how == "no-dir" or name.startswith("~")):
            continue
        got = building(lambda: path_spec(field, path, kernel, as_data=data))  # noqa: B023
        assert isinstance(got, SpecError), f"{field} = {str(path)!r} ({how}) was accepted"
        field_of(got, *PATH_ERROR_FIELDS[field])
        assert str(path) in got.message


@pytest.mark.parametrize("field", [f for f in PATH_FIELDS if f != "serial_log"])
@FEW
@given(text=hostile_text_any)
def test_unrepresentable_paths_are_spec_errors(work: Path, field: str, text: str) -> None:
    """A path with NUL or a lone surrogate names no file: a SpecError on its field."""
    if not unrepresentable(text):
        text += "\0"
    d = fresh(work)
    got = building(lambda: path_spec(field, d / f"x{text}", fake_bzimage(d / "k")))
    assert isinstance(got, SpecError)
    field_of(got, *PATH_ERROR_FIELDS[field])


USERS = sorted({"", *(p.pw_name for p in pwd.getpwall())})


@FEW
@given(
    user=st.one_of(st.sampled_from(USERS), st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)),
    rest=file_names,
)
def test_tilde_paths(work: Path, user: str, rest: str) -> None:
    """``~`` and ``~user`` are expanded (docs/spec.md); the result is checked like any path."""
    d = fresh(work)
    got = building(lambda: spec_from_dict({"cdroms": [f"~{user}/{rest}"]}, base_dir=d))
    if got is None:  # the known BUG-4, and only for a user this host does not have
        with pytest.raises(KeyError):
            pwd.getpwnam(user)
        return
    home = Path(os.path.expanduser(f"~{user}"))
    if isinstance(got, SpecError):
        field_of(got, "cdroms[0]")
        assert not (home / rest).is_file()
    else:
        assert got.cdroms == (home / rest,)


# --- ids ---------------------------------------------------------------------------------------


@MANY
@given(disk_id=ids, nic_id=ids, ephemeral=st.booleans())
def test_disk_and_nic_ids(work: Path, disk_id: str, nic_id: str, ephemeral: bool) -> None:
    qemu_refuses = qemu_refuses_disk_id(disk_id, ephemeral) or qemu_refuses_device_id(nic_id)
    disk = raw_file(fresh(work) / "d.img")
    disk_entry = {"path": str(disk), "id": disk_id, "ephemeral": ephemeral}
    data = {"guest_agent": False, "disks": [disk_entry], "networks": [{"id": nic_id}]}
    got = building(lambda: spec_from_dict(data))
    valid = [i == "" or bool(ID_RULE.fullmatch(i)) for i in (disk_id, nic_id)]
    want_disk, want_nic = disk_id or "disk0", nic_id or "net0"
    if isinstance(got, SpecError):
        field_of(got, "disks[0].id", "networks[0].id")
        assert not all(valid) or want_disk == want_nic or qemu_refuses
        if qemu_refuses:
            event("refused: an id QEMU would refuse (length or one of pyqvm's own)")
        return
    assert not qemu_refuses, "an id QEMU refuses got past the spec"
    assert got is not None and all(valid) and want_disk != want_nic
    argv = argv_of(got)
    benign = dict(data, disks=[dict(disk_entry, id="d")], networks=[{"id": "n"}])
    assert shape(argv) == shape(argv_of(spec_from_dict(benign)))
    (blockdev,) = json_args(argv, "-blockdev")
    assert blockdev["node-name"] == want_disk
    if ephemeral:
        assert blockdev["backing"]["node-name"] == f"{want_disk}-base"
    devices = {d["id"]: d for d in json_args(argv, "-device")}
    assert devices[want_disk]["drive"] == want_disk
    assert devices[want_nic]["netdev"] == want_nic
    assert [n["id"] for n in json_args(argv, "-netdev")] == [want_nic]


# --- MACs, tap names, PCI addresses, CPU models --------------------------------------------------


@MANY
@given(mac=macs)
def test_macs(mac: str) -> None:
    got = building(lambda: spec_from_dict({"guest_agent": False, "networks": [{"mac": mac}]}))
    if isinstance(got, SpecError):
        field_of(got, "networks[0].mac")
        assert not unicast_mac(mac)
        return
    assert got is not None and unicast_mac(mac)
    argv = argv_of(got)
    benign = spec_from_dict({"guest_agent": False, "networks": [{"mac": "52:54:00:00:00:01"}]})
    assert shape(argv) == shape(argv_of(benign))
    (nic,) = [d for d in json_args(argv, "-device") if d.get("netdev") == "net0"]
    assert nic["mac"] == mac


@FUZZ
@given(tap=st.one_of(hostile_text, st.from_regex(r"[A-Za-z0-9_.\-]{1,18}", fullmatch=True)))
def test_tap_names(tap: str) -> None:
    got = building(
        lambda: spec_from_dict({"guest_agent": False, "networks": [{"mode": "tap", "tap": tap}]})
    )
    if isinstance(got, SpecError):
        field_of(got, "networks[0].tap")
        assert not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", tap, re.ASCII)
        return
    assert got is not None
    argv = argv_of(got)
    assert shape(argv) == shape(
        argv_of(spec_from_dict({"guest_agent": False, "networks": [{"mode": "tap", "tap": "t"}]}))
    )
    assert json_args(argv, "-netdev")[0]["ifname"] == tap


@FUZZ
@given(
    address=st.one_of(
        hostile_text,
        st.from_regex(
            r"\s?([0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-1][0-9a-f]\.[0-7]\s?", fullmatch=True
        ),
    ),
    guest=st.one_of(
        st.none(), hostile_text, st.from_regex(r"[0-1]?[0-9a-fA-F](\.[0-7])?", fullmatch=True)
    ),
)
def test_host_device_addresses(address: str, guest: str | None) -> None:
    def make() -> VMSpec:
        return spec_from_dict(
            {
                "guest_agent": False,
                "host_devices": [{"address": address, "guest_address": guest}],
            }
        )

    got = building(make)
    if isinstance(got, SpecError):
        field_of(got, "host_devices[0].address", "host_devices[0].guest_address")
        return
    assert got is not None
    argv = argv_of(got)
    (dev,) = [d for d in json_args(argv, "-device") if d["driver"] == "vfio-pci"]
    full = address.strip() if address.count(":") == 2 else f"0000:{address.strip()}"
    assert dev["host"] == full.lower() and dev.get("addr") == guest
    if (Path("/sys/bus/pci/devices") / full.lower()).exists():
        event("a PCI device this host has")
        return
    with pytest.raises(SpecError) as err:  # no such device here: refused before QEMU
        preview_argv(got)
    assert err.value.field == "host_devices[0].address"


@FUZZ
@given(
    cpu=st.one_of(
        hostile_text, st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.+=,\-]{0,20}", fullmatch=True)
    )
)
def test_cpu_model(cpu: str) -> None:
    """``cpu`` is QEMU's own ``-cpu`` text (a model and its +flags/props), passed whole."""
    got = building(lambda: VMSpec(cpu=cpu, guest_agent=False))
    if isinstance(got, SpecError):
        field_of(got, "cpu")
        return
    assert got is not None
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+=,-]*", cpu, re.ASCII)
    argv = argv_of(got)
    assert plain_args(argv, "-cpu") == [cpu]


# --- sizes ---------------------------------------------------------------------------------------

size_strings = st.from_regex(
    r"\s?[0-9]{1,9}\s?(K|M|G|T|k|m|g|t)?(B|iB|b|ib|IB)?\s?", fullmatch=True
)
sizes = st.one_of(
    st.integers(-(2**40), 2**40),
    size_strings,
    hostile_text,
    st.sampled_from(
        [
            "\u0665\u0661\u0662M",
            "\uff11G",
            "512 M",
            "0x200",
            "1e3",
            "512MB",
            "1.5G",
            "-1G",
            "+1G",
            "",
        ]
    ),
    st.floats(allow_nan=True),
    st.booleans(),
)


def expected_mib(value: object) -> int | None:
    """The MiB docs/spec.md says a size is (ASCII digits, binary units, case-insensitive,
    at most 2**63 bytes: QEMU's own ceiling)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if not isinstance(value, str):
        return None
    # (pyqvm also takes spaces between the number and its unit: "512 M")
    m = re.fullmatch(r"\s*([0-9]+)\s*([KMGT]?)(?:i?B)?\s*", value, re.IGNORECASE | re.ASCII)
    if not m:
        return None
    n, unit = int(m[1]), m[2].upper()
    if unit == "K":
        if n % 1024:
            return None
        mib = n // 1024
    else:
        mib = n * {"": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[unit]
    return mib if 0 < mib < 2**63 // 2**20 else None


@MANY
@given(memory=sizes, max_memory=st.one_of(st.none(), sizes))
def test_memory_sizes(memory: Any, max_memory: Any) -> None:
    def make() -> VMSpec:
        slots = {} if max_memory is None else {"max_memory": max_memory, "memory_slots": 1}
        return VMSpec(memory=memory, guest_agent=False, **slots)

    got = building(make)
    mib, max_mib = expected_mib(memory), expected_mib(max_memory)
    if isinstance(got, SpecError):
        field_of(got, "memory", "max_memory")
        if got.field == "memory":
            assert mib is None or not str(memory).isascii()
        elif max_mib is not None and mib is not None:
            assert max_mib < mib  # a valid max_memory is refused only when below memory
        return
    assert got is not None and isinstance(got.memory, int)
    if mib is None:  # accepted though docs/spec.md's forms do not cover it: non-ASCII digits
        assert isinstance(memory, str) and not memory.isascii()
        event("accepted a size with non-ASCII digits or spaces")
    else:
        assert got.memory == mib
    argv = argv_of(got)
    m_arg = plain_args(argv, "-m")[0]
    implied, pairs = keyvalue(m_arg)
    # Under TCG pyqvm adds 8 KiB (QEMU < 9.0 loses dirty pages of whole-256-KiB RAM blocks).
    pad = 8 if plain_args(argv, "-accel") == ["tcg"] else 0
    assert implied == f"{got.memory * 1024 + pad}K"
    if max_memory is not None:
        assert isinstance(got.max_memory, int)
        assert pairs == {"slots": "1", "maxmem": f"{got.max_memory * 1024 + pad}K"}
    (ram,) = [o for o in json_args(argv, "-object") if o["id"] == "pq-ram"]
    assert ram["size"] == (got.memory << 20) + pad * 1024


# --- ports and addresses -------------------------------------------------------------------------

anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    hostile_text,
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
ports = st.one_of(st.integers(-5, 70000), st.sampled_from([0, 1, 65535, 65536, -1]), anything)


@MANY
@given(
    host_port=ports,
    guest_port=ports,
    protocol=st.one_of(st.sampled_from(["tcp", "udp"]), hostile_text),
    address=addresses,
)
def test_port_forwards(host_port: Any, guest_port: Any, protocol: str, address: str) -> None:
    forward = {
        "host_port": host_port,
        "guest_port": guest_port,
        "protocol": protocol,
        "host_address": address,
    }
    forward = {k: v for k, v in forward.items() if v is not None}
    got = building(
        lambda: spec_from_dict({"guest_agent": False, "networks": [{"forwards": [forward]}]})
    )
    if got is None:
        return
    if isinstance(got, SpecError):
        where = "networks[0].forwards[0]"
        keys = ("host_port", "guest_port", "protocol", "host_address")  # a missing one too
        field_of(got, *(f"{where}.{k}" for k in keys), where)
        return

    def is_port(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65535

    assert is_port(host_port) and is_port(guest_port) and protocol in ("tcp", "udp")
    assert re.fullmatch(r"[0-9A-Za-z.:-]*", address, re.ASCII)
    assert not slirp_misreads(address), "an address slirp misreads got past the spec"
    argv = argv_of(got)
    (netdev,) = json_args(argv, "-netdev")
    assert netdev["hostfwd"] == [{"str": f"{protocol}:{address}:{host_port}-:{guest_port}"}]


# --- kernel command lines ----------------------------------------------------------------------


@MANY
@given(
    # mostly text an argv can carry; a fifth with NUL or lone surrogates (BUG-9)
    append=st.integers(0, 4).flatmap(lambda i: hostile_text_any if i == 4 else hostile_text),
    machine=st.sampled_from(["q35", "microvm"]),
)
def test_kernel_command_line(work: Path, append: str, machine: str) -> None:
    kernel = fake_bzimage(fresh(work) / "vmlinuz")
    got = building(
        lambda: VMSpec(kernel=KernelBoot(kernel, append=append), machine=machine, guest_agent=False)  # type: ignore[arg-type]
    )
    if unrepresentable(append):  # no argv can carry it: refused, naming the field
        assert isinstance(got, SpecError) and got.field == "kernel.append", got
        return
    assert isinstance(got, VMSpec)
    argv = argv_of(got)
    want = append
    tsc = TSC_KHZ
    if machine == "microvm" and tsc and "tsc_early_khz=" not in append:
        # pyqvm adds the TSC rate on microvm (argv/build.py kernel_append), and strips
        want = f"{append} tsc_early_khz={tsc}".strip()
    assert plain_args(argv, "-append") == ([want] if want else [])
    benign = VMSpec(kernel=KernelBoot(kernel, append="x"), machine=machine, guest_agent=False)  # type: ignore[arg-type]
    if want:
        assert shape(argv) == shape(argv_of(benign))


TSC_KHZ = read_host_facts().tsc_khz


# --- unknown keys ------------------------------------------------------------------------------

TABLES: dict[str, tuple[str, type]] = {
    "": ("", VMSpec),
    "kernel": ("kernel", KernelBoot),
    "disk": ("disks[0]", Disk),
    "network": ("networks[0]", Network),
    "forward": ("networks[0].forwards[0]", PortForward),
    "host_device": ("host_devices[0]", HostDevice),
}


def table_data(table: str, extra: dict[str, Any], disk: Path, kernel: Path) -> dict[str, Any]:
    """A minimal valid spec as data, with ``extra`` keys put into ``table``."""
    data: dict[str, Any] = {"guest_agent": False}
    if table == "":
        data |= extra
    elif table == "kernel":
        data["kernel"] = {"kernel": str(kernel), **extra}
    elif table == "disk":
        data["disks"] = [{"path": str(disk), **extra}]
    elif table == "network":
        data["networks"] = [extra]
    elif table == "forward":
        data["networks"] = [{"forwards": [{"host_port": 2222, "guest_port": 22, **extra}]}]
    else:
        data["host_devices"] = [{"address": "01:00.0", **extra}]
    return data


@pytest.mark.parametrize("table", list(TABLES))
@FUZZ
@given(key=st.one_of(hostile_text, st.sampled_from(["", "Name", "memory ", "path.x", "id[0]"])))
def test_unknown_keys_are_named(work: Path, table: str, key: str) -> None:
    where, cls = TABLES[table]
    if key in {f.name for f in dataclasses.fields(cls)}:
        return
    d = fresh(work)
    data = table_data(table, {key: 1}, raw_file(d / "d.img"), fake_bzimage(d / "k"))
    got = building(lambda: spec_from_dict(data))
    assert isinstance(got, SpecError)
    field_of(got, f"{where}.{key}" if where else key)
    assert got.message.startswith("unknown field; known fields: ")


# --- every field, every type -------------------------------------------------------------------

json_like = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**64), 2**64),
        st.floats(),
        hostile_text,
        st.sampled_from(["auto", "q35", "pc", "microvm", "virtio", "emulated", "tcg", "raw"]),
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile_text, inner, max_size=3),
    max_leaves=6,
)


def type_matches(hint: Any, value: Any) -> bool:
    """Whether ``value`` (data, as from TOML) has the type the field declares."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(type_matches(a, value) for a in args)
    if origin is typing.Literal:
        return isinstance(value, str) and value in args
    if origin is tuple:
        return isinstance(value, list)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is Path:
        return isinstance(value, str)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict) or (hint is KernelBoot and isinstance(value, str))
    raise AssertionError(f"no rule for {hint}")


#: Fields whose checks let other types through (BUG-8): fuzzed with their own type only.
BOOL_FIELDS = {
    "rng",
    "balloon",
    "guest_agent",
    "sandbox",
    "ephemeral",
    "readonly",
    "multifunction",
    "rombar",
}


def typed_value(key: str) -> st.SearchStrategy[Any]:
    if key in BOOL_FIELDS:
        return st.one_of(st.booleans(), st.none()) if key == "rombar" else st.booleans()
    if key == "ready_pattern":
        return st.one_of(st.none(), hostile_text)
    if key == "ready_timeout":
        return st.one_of(st.floats(0.001, 1e6), st.integers(-5, 10**6), hostile_text)
    if key == "serial_log":
        # strings: test_hostile_file_names and the BUG-5 tests
        return json_like.filter(lambda v: not isinstance(v, str))
    return json_like


FIELD_CASES = [
    (table, f.name) for table, (_, cls) in TABLES.items() for f in dataclasses.fields(cls)
]


@pytest.mark.parametrize(
    ("table", "key"), FIELD_CASES, ids=[f"{t or 'spec'}.{k}" for t, k in FIELD_CASES]
)
@settings(FUZZ, max_examples=30)
@given(data=st.data())
def test_every_field_any_type(work: Path, table: str, key: str, data: st.DataObject) -> None:
    """A value of the wrong type is a SpecError on exactly that field; a value of the right type
    is a spec whose argv is well formed, or a SpecError on some field."""
    value = data.draw(typed_value(key), label=key)
    where, cls = TABLES[table]
    path = f"{where}.{key}" if where else key
    d = fresh(work)
    spec_data = table_data(table, {key: value}, raw_file(d / "d.img"), fake_bzimage(d / "k"))
    got = building(lambda: spec_from_dict(spec_data, base_dir=d))
    if got is None:
        return
    if key == "id" and value is None:
        value = ""  # (data without TOML may say None for "no id": the default id, as for "")
    if key == "id" and not value and not isinstance(value, str):
        event("known BUG-17 a falsy non-string id (0, false, [], {}) taken for no id")
        return
    if not type_matches(typing.get_type_hints(cls)[key], value):
        if isinstance(value, str) and value.startswith("~"):
            return  # a path: expanded first
        assert isinstance(got, SpecError), f"{path} = {value!r} was accepted"
        assert got.field == path or got.field.startswith((f"{path}.", f"{path}[")), got
        return
    if isinstance(got, SpecError):
        top = re.split(r"[.\[]", got.field, maxsplit=1)[0]
        assert top in {f.name for f in dataclasses.fields(VMSpec)}, got
        return
    argv_of(got)


# --- TOML ----------------------------------------------------------------------------------------


def toml_key(k: str) -> str:
    return toml_value(k)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return (
            "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
        )
    if isinstance(v, str):
        out = []
        for c in v:
            if c in '"\\':
                out.append("\\" + c)
            elif ord(c) < 0x20 or ord(c) == 0x7F:
                out.append(f"\\u{ord(c):04x}")
            else:
                out.append(c)
        return '"' + "".join(out) + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise AssertionError(v)


def to_toml(data: dict[str, Any]) -> str:
    return "".join(f"{toml_key(k)} = {toml_value(v)}\n" for k, v in data.items())


toml_like = st.recursive(
    st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(), hostile_text),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile_text, inner, max_size=3),
    max_leaves=6,
)


def outcome(make: typing.Callable[[], VMSpec]) -> tuple[str, Any]:
    try:
        return ("spec", make())
    except SpecError as e:
        return ("error", (e.field, e.message))


@MANY
@given(
    fields=st.dictionaries(
        st.sampled_from([f.name for f in dataclasses.fields(VMSpec)] + ["colour"]),
        toml_like,
        max_size=4,
    )
)
def test_toml_means_what_the_data_means(work: Path, fields: dict[str, Any]) -> None:
    """`load_spec` of a file gives what `spec_from_dict` gives for its data: the same spec, or
    the same SpecError on the same field."""
    d = fresh(work).resolve()
    toml = d / "vm.toml"
    toml.write_text(to_toml(fields), encoding="utf-8")
    from_file = outcome(lambda: load_spec(toml))
    from_data = outcome(lambda: spec_from_dict(fields, base_dir=d))
    if from_file[0] == "error" and from_data[0] == "error":
        event(f"refused: {from_file[1][0] or 'file'}")
    # nan != nan: compare ready_timeout separately
    assert repr(from_file) == repr(from_data)


VALID_TOML = """\
name = "web"
memory = "1G"
smp = 2
machine = "q35"
serial_log = "console.log"
kernel = {{ kernel = "{kernel}", initrd = "{initrd}", append = "console=ttyS0 quiet" }}
cdroms = ["{disk}"]
[[disks]]
path = "{disk}"
id = "data"
format = "raw"
ephemeral = false
[[networks]]
mac = "52:54:00:12:34:56"
forwards = [{{ host_port = 2222, guest_port = 22, protocol = "tcp" }}]
"""

mutations = st.lists(
    st.tuples(
        st.sampled_from(["insert", "delete", "replace"]),
        st.integers(0, 10_000),
        st.integers(1, 12),
        st.one_of(
            st.sampled_from(
                [
                    '"',
                    "=",
                    "[",
                    "]",
                    "{",
                    "}",
                    ",",
                    "\n",
                    "#",
                    "'",
                    "\\",
                    "-",
                    "0",
                    "true",
                    "[[disks]]\n",
                    "x = 1\n",
                    "\\u0000",
                ]
            ),
            hostile_text,
        ),
    ),
    min_size=1,
    max_size=4,
)


@MANY
@given(edits=mutations)
def test_mutated_toml(work: Path, edits: list[tuple[str, int, int, str]]) -> None:
    """A valid spec file, damaged anywhere: a SpecError (no field for a syntax error), or a spec
    whose argv is well formed."""
    d = fresh(work)
    raw_file(d / "d.img")
    fake_bzimage(d / "k")
    raw_file(d / "i")
    text = VALID_TOML.format(kernel="k", initrd="i", disk="d.img")
    assert isinstance(load_spec(_write(d, text)), VMSpec)
    for op, pos, n, piece in edits:
        pos %= len(text) + 1
        if op == "insert":
            text = text[:pos] + piece + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + n :]
        else:
            text = text[:pos] + piece + text[pos + n :]
    got = building(lambda: load_spec(_write(d, text)))
    if isinstance(got, SpecError):
        if got.field == "":
            assert "not valid TOML" in got.message
        event("refused" + (" (syntax)" if got.field == "" else ""))
        return
    if got is None:
        return
    assert got.kernel is None or not unrepresentable(got.kernel.append)
    log = got.serial_log
    assert log is None or (log.parent.is_dir() and not log.is_dir())
    event("accepted")
    argv_of(got)


def _write(d: Path, text: str) -> Path:
    p = d / "vm.toml"
    p.write_text(text, encoding="utf-8")
    return p


@FUZZ
@given(blob=st.binary(max_size=300))
def test_arbitrary_bytes_as_toml(work: Path, blob: bytes) -> None:
    got = building(lambda: load_spec(_write_bytes(fresh(work), blob)))
    assert got is None or isinstance(got, SpecError | VMSpec)


def _write_bytes(d: Path, blob: bytes) -> Path:
    p = d / "vm.toml"
    p.write_bytes(blob)
    return p


# --- kernel files ------------------------------------------------------------------------------

_offsets = st.one_of(st.integers(0, 400), st.integers(0, 2**64 - 1))


@FEW
@given(
    phoff=_offsets,
    shoff=_offsets,
    counts=st.tuples(st.integers(0, 8), st.integers(0, 8), st.integers(0, 10)),
    entsizes=st.tuples(st.sampled_from([56, 0, 1, 100]), st.sampled_from([64, 0, 1, 100])),
    machine=st.integers(0, 300),
    tail=st.binary(max_size=600),
)
def test_damaged_kernel_files(
    work: Path,
    phoff: int,
    shoff: int,
    counts: tuple[int, int, int],
    entsizes: tuple[int, int],
    machine: int,
    tail: bytes,
) -> None:
    """An ELF-looking kernel with damaged headers: a SpecError on kernel.kernel before QEMU."""
    phnum, shnum, shstrndx = counts
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    header += struct.pack(
        "<HHIQQQIHHHHHH", 2, machine, 1, 0, phoff, shoff, 0, 64,
        entsizes[0], phnum, entsizes[1], shnum, shstrndx,
    )  # fmt: skip
    kernel = fresh(work) / "vmlinux"
    kernel.write_bytes(header + tail)
    spec = VMSpec(kernel=KernelBoot(kernel), machine="q35", guest_agent=False)
    try:
        argv = preview_argv(spec)
    except SpecError as e:
        field_of(e, "kernel.kernel")
        return
    event("a damaged ELF taken for a kernel")
    assert plain_args(argv, "-kernel") == [str(kernel)]


# =============================================================================================
# The bugs the fuzzing found, each with its minimal input (all fixed; they guard against their
# return).
# =============================================================================================


def refused(make: typing.Callable[[], object], field: str) -> None:
    """``make()`` raises a SpecError whose field matches ``field`` (a regex)."""
    with pytest.raises(SpecError) as err:
        make()
    assert re.fullmatch(field, err.value.field), err.value


def refused_before_qemu(make: typing.Callable[[], VMSpec], field: str) -> None:
    """A SpecError on ``field`` when the spec is built, or at the latest when pyqvm resolves it
    for a launch (`preview_argv` runs what `start()` runs before QEMU)."""
    refused(lambda: argv_of(make()), field)


def test_bug_toml_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "vm.toml").write_bytes(b'name = "\xff"\n')
    refused(lambda: load_spec(tmp_path / "vm.toml"), "")


def test_bug_toml_is_a_directory(tmp_path: Path) -> None:
    refused(lambda: load_spec(tmp_path), "")


def test_bug_huge_size_string() -> None:
    refused(lambda: VMSpec(memory="9" * 5000), "memory")


def test_bug_huge_toml_integer(tmp_path: Path) -> None:
    (tmp_path / "vm.toml").write_text("smp = " + "9" * 5000 + "\n")
    refused(lambda: load_spec(tmp_path / "vm.toml"), "(smp)?")


def test_bug_huge_int_in_message() -> None:
    refused(lambda: VMSpec(smp=10**5000), "smp")


def test_bug_tilde_unknown_user() -> None:
    refused(lambda: spec_from_dict({"cdroms": ["~nosuchuser-pyqvm/x.iso"]}), r"cdroms\[0\]")


def test_bug_tilde_unknown_user_vmspec() -> None:
    refused(lambda: VMSpec(cdroms=(Path("~nosuchuser-pyqvm/x.iso"),)), r"cdroms\[0\]")


@pytest.mark.parametrize(
    "where",
    [
        pytest.param("missing-dir"),
        pytest.param("is-dir"),
        pytest.param("nul"),
        pytest.param("surrogate"),
    ],
)
def test_bug_serial_log_checked_before_qemu(tmp_path: Path, where: str) -> None:
    """serial_log need not exist, but its directory must, and it must be a possible file;
    machine._launch writes it (console.path.write_bytes) with nothing to catch the OSError."""
    log = {
        "missing-dir": tmp_path / "no-such-dir" / "console.log",
        "is-dir": tmp_path,
        "nul": tmp_path / "a\0b",
        "surrogate": tmp_path / "a\ud800b",
    }[where]
    refused_before_qemu(lambda: VMSpec(serial_log=log, guest_agent=False), "serial_log")


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"cpu": 5}, "cpu"),
        ({"networks": [{"mac": 5}]}, r"networks\[0\]\.mac"),
        ({"networks": [{"mode": "tap", "tap": 5}]}, r"networks\[0\]\.tap"),
        (
            {"host_devices": [{"address": "01:00.0", "guest_address": 5}]},
            r"host_devices\[0\]\.guest_address",
        ),
        (
            {"networks": [{"forwards": [{"host_port": 1, "guest_port": 2, "host_address": 5}]}]},
            r"networks\[0\]\.forwards\[0\]\.host_address",
        ),
    ],
)
def test_bug_non_string_to_a_pattern(data: dict[str, Any], field: str) -> None:
    refused(lambda: spec_from_dict(data), field)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"disks": [{}]}, r"disks\[0\](\.path)?"),
        ({"kernel": {"append": "quiet"}}, r"kernel(\.kernel)?"),
        (
            {"networks": [{"forwards": [{"host_port": 2222}]}]},
            r"networks\[0\]\.forwards\[0\](\.guest_port)?",
        ),
        ({"host_devices": [{}]}, r"host_devices\[0\](\.address)?"),
    ],
)
def test_bug_missing_required_key(data: dict[str, Any], field: str) -> None:
    refused(lambda: spec_from_dict(data), field)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"rng": "no"}, "rng"),
        ({"sandbox": "false"}, "sandbox"),
        ({"guest_agent": 0}, "guest_agent"),
        ({"disks": [{"path": "/etc/hostname", "readonly": "false"}]}, r"disks\[0\]\.readonly"),
        ({"disks": [{"path": "/etc/hostname", "ephemeral": "no"}]}, r"disks\[0\]\.ephemeral"),
        ({"host_devices": [{"address": "01:00.0", "rombar": "x"}]}, r"host_devices\[0\]\.rombar"),
        (
            {"host_devices": [{"address": "01:00.0", "multifunction": 2}]},
            r"host_devices\[0\]\.multifunction",
        ),
        ({"ready": "console", "ready_pattern": 5}, "ready_pattern"),
        ({"ready_timeout": float("nan")}, "ready_timeout"),
        ({"ready_timeout": float("inf")}, "ready_timeout"),
        ({"ready_timeout": True}, "ready_timeout"),
    ],
)
def test_bug_wrong_type_accepted(data: dict[str, Any], field: str) -> None:
    refused(lambda: spec_from_dict(data), field)


def test_bug_rombar_string_in_argv() -> None:
    refused_before_qemu(
        lambda: VMSpec(host_devices=[HostDevice("01:00.0", rombar="x")], guest_agent=False),  # type: ignore[arg-type]
        r"host_device\.rombar|host_devices\[0\]\.rombar",
    )


@pytest.mark.parametrize("append", ["a\0b", "a\ud800b"])
def test_bug_unexecutable_append(tmp_path: Path, append: str) -> None:
    kernel = fake_bzimage(tmp_path / "k")
    refused_before_qemu(
        lambda: VMSpec(kernel=KernelBoot(kernel, append=append), guest_agent=False),
        r"kernel\.append",
    )


@pytest.mark.parametrize(
    ("disks", "cdroms", "field"),
    [
        ([{"id": "a" * 32, "ephemeral": False}], 0, r"disks\[0\]\.id"),
        ([{"id": "a" * 27}], 0, r"disks\[0\]\.id"),  # its backing node a...a-base: 32 bytes
        ([{"id": "pq-balloon", "ephemeral": False}], 0, r"disks\[0\]\.id"),
        ([{"id": "a"}, {"id": "a-base", "ephemeral": False}], 0, r"disks\[1\]\.id"),
        (
            [{"id": "scsi0", "interface": "virtio-scsi", "ephemeral": False}],
            0,
            r"disks\[0\]\.id",
        ),
        ([{"id": "cd0", "ephemeral": False}], 1, r"disks\[0\]\.id"),
    ],
)
def test_bug_disk_ids_qemu_refuses(
    tmp_path: Path, disks: list[dict[str, Any]], cdroms: int, field: str
) -> None:
    f = str(raw_file(tmp_path / "d.img"))
    data = {"disks": [{"path": f, **d} for d in disks], "cdroms": [f] * cdroms, "machine": "q35"}
    refused_before_qemu(lambda: spec_from_dict(dict(data, guest_agent=False)), field)


def test_bug_nic_id_qemu_refuses() -> None:
    data = {"guest_agent": False, "networks": [{"id": "pq-rng-dev"}]}
    refused_before_qemu(lambda: spec_from_dict(data), r"networks\[0\]\.id")


def test_bug_non_utf8_file_name(tmp_path: Path) -> None:
    f = raw_file(Path(os.fsdecode(os.fsencode(tmp_path) + b"/x\xff.img")))
    refused_before_qemu(
        lambda: VMSpec(disks=(Disk(f, ephemeral=False),), guest_agent=False),
        r"disk\.path|disks\[0\]\.path",
    )


@pytest.mark.parametrize(
    "address", ["localhost", "::1", "127.1", "0x7f.1", "4294967295", "010.0.0.1", "1.2.3.4:5-"]
)
def test_bug_host_address_not_an_address(address: str) -> None:
    refused(lambda: PortForward(2222, 22, host_address=address), r"forward\.host_address")


@pytest.mark.parametrize(("host", "guest"), [(2222, 0), (0, 22)])
def test_bug_port_zero(host: int, guest: int) -> None:
    refused(lambda: PortForward(host, guest), r"forward\.(host|guest)_port")


def test_bug_duplicate_forwards() -> None:
    nets = (Network(forwards=(PortForward(2222, 22),)), Network(forwards=(PortForward(2222, 23),)))
    refused(lambda: VMSpec(networks=nets), r"networks\[1\]\.forwards\[0\].*")


def test_bug_zero_mac() -> None:
    refused(lambda: Network(mac="00:00:00:00:00:00"), r"network\.mac")


@pytest.mark.parametrize("value", [0, False, [], {}])
def test_bug_falsy_id(value: object) -> None:
    refused(lambda: spec_from_dict({"networks": [{"id": value}]}), r"networks\[0\]\.id")


def test_bug_memory_beyond_qemu() -> None:
    refused(lambda: VMSpec(memory="16777216T"), "memory")
