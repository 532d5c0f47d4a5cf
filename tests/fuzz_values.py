"""What the spec fuzz tests share (tests/unit/test_spec_fuzz.py, tests/e2e/test_fuzz_qemu.py):
hostile value strategies, a reading of a QEMU argv the way QEMU reads it, and the narrow
predicates that keep the known pyqvm bugs (each proven by a strict xfail test) out of the
properties.

QEMU's command line, as QEMU 7.2 reads it: after ``argv[0]`` every element is an option
(``-name``), each option but a few flags takes the next element whole as its argument, whatever
it starts with, and an element that is not an option is a disk image (``-hda``). An argument is
either JSON (``-device``, ``-object``, ``-netdev``, ``-blockdev`` when it starts with ``{``),
QEMU's ``key=value,...`` syntax with ``,,`` for a literal comma, or a plain string (``-kernel``,
``-initrd``, ``-append``).
"""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

# --- hostile values --------------------------------------------------------------------------

#: Pieces that mean something to QEMU's option parser, its JSON parser, slirp, a shell, the
#: kernel command line or a terminal, and a few that only look like something.
SPECIALS = [
    ",",
    ",,",
    "=",
    '"',
    "'",
    "\\",
    " ",
    "\n",
    "\t",
    "\r",
    "\x1b[2J",
    "-",
    "--",
    ":",
    ";",
    "{",
    "}",
    "[",
    "]",
    "$",
    "$(id)",
    "`",
    "*",
    "?",
    "#",
    "%s",
    "..",
    "~",
    "é",
    "日本",
    "🦀",
    "\u202e",  # right-to-left override
    "\ufeff",  # byte order mark
    "\u00a0",  # no-break space
    "\u2028",  # line separator
    "json:",
    "file.",
    "nbd:",
    "readonly=on",
    ",readonly=off",
    ",file.driver=nbd,file.host=127.0.0.1",
    ",logappend=on",
    ",id=pq-qmp",
    ",hostfwd=tcp::1-:2",
    "-S",
    "-device",
    "-object",
    "id=",
    'x","driver":"nbd',
    "\\u0000",
]

#: Characters no file name can hold (NUL), or that are not valid UTF-8 once encoded as the OS
#: does (lone surrogates; ``\udcff`` is the byte 0xff under surrogateescape).
UNREPRESENTABLE = ["\0", "\ud800", "\udcff"]

pieces = st.one_of(
    st.sampled_from(SPECIALS),
    st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=6),
    st.characters(codec="utf-8"),
)
#: Any text, weighted towards what is hostile to QEMU's parsers.
hostile_text = st.lists(pieces, max_size=10).map("".join)
#: Hostile text that can also hold NUL and lone surrogates.
hostile_text_any = st.lists(st.one_of(pieces, st.sampled_from(UNREPRESENTABLE)), max_size=10).map(
    "".join
)


def _usable_name(name: str) -> bool:
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        return False
    try:
        return len(name.encode()) <= 200
    except UnicodeEncodeError:
        return False


#: One file name (no ``/``) that a file can have, valid UTF-8, full of hostile pieces.
file_names = st.one_of(
    st.lists(pieces, min_size=1, max_size=10).map("".join).filter(_usable_name),
    st.sampled_from(
        [
            "a,readonly=off.img",
            "x,file.driver=nbd,file.host=127.0.0.1.qcow2",
            "-S",
            "-drive",
            "--",
            " ",
            "\n",
            "json:{}",
            'a"b',
            "a\\b",
            "日本語.img",
            ",",
            ",,",
            "=",
            "~",
            "~root",
        ]
    ),
)

#: Ids: mostly QEMU-shaped (so that they are accepted), some hostile.
ids = st.one_of(
    st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,20}", fullmatch=True),
    hostile_text,
    st.sampled_from(["a", "disk0", "net0", "root", "x-base", "9net", "-a", "a b", "a,b", "é"]),
)

#: What a MAC looks like, with the shapes pyqvm must refuse mixed in.
macs = st.one_of(
    st.lists(st.integers(0, 255), min_size=6, max_size=6).map(
        lambda b: ":".join(f"{x:02x}" for x in b)
    ),
    st.from_regex(r"(?:[0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", fullmatch=True),
    st.from_regex(r"[0-9a-fA-F:.\-]{0,20}", fullmatch=True),
    hostile_text,
)

#: Host addresses: dotted quads, loopback, the documented "" (all addresses), and junk.
addresses = st.one_of(
    st.lists(st.integers(0, 255), min_size=4, max_size=4).map(lambda q: ".".join(map(str, q))),
    st.sampled_from(["", "127.0.0.1", "0.0.0.0", "127.1", "localhost", "::1", "1.2.3.4:5-"]),
    st.from_regex(r"[0-9A-Za-z.:\-]{0,16}", fullmatch=True),
    hostile_text,
)

# --- the rules pyqvm documents (docs/spec.md), written independently of src/ -----------------

NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)
ID_RULE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*", re.ASCII)
MAC_RULE = re.compile(r"(?:[0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", re.ASCII)
#: QEMU's block node names live in a 32-byte buffer (block.c bdrv_assign_node_name).
NODE_NAME_MAX = 31


def canonical_ipv4(text: str) -> bool:
    """Four decimal numbers 0-255 without leading zeros: what slirp binds to is what it says."""
    parts = text.split(".")
    return len(parts) == 4 and all(
        p.isascii() and p.isdigit() and str(int(p)) == p and int(p) <= 255 for p in parts
    )


# --- values QEMU would refuse or misread: pyqvm must refuse them first (once bugs, now fixed) --

#: Device ids pyqvm gives its own devices, and block node names it gives its own nodes.
OWN_DEVICE_IDS = re.compile(r"pq-vser|pq-rng-dev|pq-balloon|pq-hp\d+|scsi0|cd\d+", re.ASCII)
OWN_NODE_NAMES = re.compile(r"pq-ovmf-code|cd\d+", re.ASCII)


def qemu_refuses_disk_id(disk_id: str, ephemeral: bool, other_ids: Sequence[str] = ()) -> bool:
    """A well-formed disk id QEMU would refuse: too long a node name (ephemeral disks also get
    ``<id>-base``), or one of pyqvm's own ids."""
    if not ID_RULE.fullmatch(disk_id):
        return False
    longest = disk_id + "-base" if ephemeral else disk_id
    return (
        len(longest) > NODE_NAME_MAX
        or bool(OWN_DEVICE_IDS.fullmatch(disk_id) or OWN_NODE_NAMES.fullmatch(disk_id))
        or any(disk_id == f"{o}-base" or o == f"{disk_id}-base" for o in other_ids)
    )


def qemu_refuses_device_id(device_id: str) -> bool:
    """A NIC id that is one of pyqvm's own device ids (QEMU: Duplicate device ID)."""
    return bool(ID_RULE.fullmatch(device_id) and OWN_DEVICE_IDS.fullmatch(device_id))


def unicast_mac(mac: str) -> bool:
    """A MAC a NIC can have, as pyqvm requires: well-formed, not all zero, not multicast."""
    return (
        bool(MAC_RULE.fullmatch(mac))
        and int(mac.replace(":", ""), 16) != 0
        and not int(mac[:2], 16) & 1
    )


def slirp_misreads(address: str) -> bool:
    """An address of the right characters that slirp refuses or reads differently."""
    return (
        address != ""
        and re.fullmatch(r"[0-9A-Za-z.:-]*", address) is not None
        and not canonical_ipv4(address)
    )


def unrepresentable(text: str) -> bool:
    """NUL or a lone surrogate: an argv element or a JSON string QEMU cannot be given."""
    if "\0" in text:
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


# --- reading an argv as QEMU does -------------------------------------------------------------

#: Options that take no argument (of those pyqvm or these tests use).
FLAGS = frozenset({"-nodefaults", "-no-user-config", "-S"})
JSON_OPTIONS = frozenset({"-device", "-object", "-netdev", "-blockdev"})
KEYVALUE_OPTIONS = frozenset(
    {"-name", "-machine", "-chardev", "-mon", "-sandbox", "-m", "-smp", "-cpu"}
)


def options(argv: Sequence[str]) -> list[tuple[str, str | None]]:
    """``argv`` as (option, argument) pairs; fails on anything QEMU would not read as options."""
    out: list[tuple[str, str | None]] = []
    i = 1
    while i < len(argv):
        opt = argv[i]
        assert opt.startswith("-"), f"argv[{i}] = {opt!r} is no option: QEMU takes it as a disk"
        if opt in FLAGS:
            out.append((opt, None))
            i += 1
            continue
        assert i + 1 < len(argv), f"{opt} has no argument"
        out.append((opt, argv[i + 1]))
        i += 2
    return out


def split_keyvalue(text: str) -> list[str]:
    """QEMU's ``a,b=c,,d`` split at single commas, ``,,`` read as one literal comma."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def keyvalue(text: str) -> tuple[str | None, dict[str, str]]:
    """(implied first value, {key: value}) of a ``key=value,...`` argument."""
    parts = split_keyvalue(text)
    implied = None
    if parts and "=" not in parts[0]:
        implied = parts.pop(0)
    pairs: dict[str, str] = {}
    for p in parts:
        key, sep, value = p.partition("=")
        assert sep, f"{p!r} in {text!r} is no key=value"
        assert key not in pairs, f"{key} given twice in {text!r}"
        pairs[key] = value
    return implied, pairs


def _json_shape(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted((k, _json_shape(x)) for k, x in v.items()))
    if isinstance(v, list):
        return tuple(_json_shape(x) for x in v)
    return type(v).__name__


def shape(argv: Sequence[str]) -> list[tuple[str, Any]]:
    """The argv with every value blanked out: which options, which keys. A value that injects an
    option or splits off a ``key=value`` changes the shape."""
    out: list[tuple[str, Any]] = []
    for opt, arg in options(argv):
        if arg is None:
            out.append((opt, None))
        elif opt in JSON_OPTIONS and arg.startswith("{"):
            out.append((opt, _json_shape(json.loads(arg))))
        elif opt in KEYVALUE_OPTIONS:
            implied, pairs = keyvalue(arg)
            out.append((opt, (implied is not None, tuple(pairs))))
        else:
            out.append((opt, "plain"))
    return out


def json_args(argv: Sequence[str], opt: str) -> list[dict[str, Any]]:
    return [json.loads(a) for o, a in options(argv) if o == opt and a is not None]


def plain_args(argv: Sequence[str], opt: str) -> list[str]:
    return [a for o, a in options(argv) if o == opt and a is not None]


def strings_in(v: Any) -> Iterator[str]:
    if isinstance(v, str):
        yield v
    elif isinstance(v, dict):
        for k, x in v.items():
            yield k
            yield from strings_in(x)
    elif isinstance(v, list):
        for x in v:
            yield from strings_in(x)


def assert_launchable(argv: Sequence[str]) -> None:
    """Every element can be handed to execve (no NUL, encodable), every JSON argument parses and
    carries only valid UTF-8 (QEMU's JSON parser refuses lone surrogates)."""
    for a in argv:
        assert b"\0" not in os.fsencode(a), f"NUL in argv element {a!r}"
    for opt, arg in options(argv):
        if opt in JSON_OPTIONS and arg is not None and arg.startswith("{"):
            for s in strings_in(json.loads(arg)):
                s.encode()  # UnicodeEncodeError on a lone surrogate


def ids_are_unique(argv: Sequence[str]) -> None:
    """QEMU refuses two devices, block nodes, netdevs, objects or chardevs of one id."""

    def nodes(tree: Any) -> Iterator[str]:
        if isinstance(tree, dict):
            if "node-name" in tree:
                yield tree["node-name"]
            for v in tree.values():
                yield from nodes(v)

    spaces = {
        "device": [d["id"] for d in json_args(argv, "-device") if "id" in d],
        "node": [n for b in json_args(argv, "-blockdev") for n in nodes(b)],
        "netdev": [n["id"] for n in json_args(argv, "-netdev")],
        "object": [o["id"] for o in json_args(argv, "-object")],
        "chardev": [keyvalue(a)[1]["id"] for a in plain_args(argv, "-chardev")],
    }
    for space, names in spaces.items():
        dup = {n for n in names if names.count(n) > 1}
        assert not dup, f"{space} ids given twice: {sorted(dup)}"
    for n in spaces["node"]:
        assert len(n.encode()) <= NODE_NAME_MAX, f"node name {n!r} is too long for QEMU"


def fake_bzimage(path: Path) -> Path:
    """The smallest file `pyqvm.host.kernel.inspect_kernel` takes for a bzImage."""
    setup = bytearray(1024)
    setup[0x1F1] = 1
    setup[0x202:0x206] = b"HdrS"
    setup[0x206:0x208] = (0x20F).to_bytes(2, "little")
    path.write_bytes(bytes(setup))
    return path
