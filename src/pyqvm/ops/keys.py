"""The keyboard, through QMP ``send-key`` (QEMU's key codes, ``qcode``), with a US keymap.

``press("ctrl-alt-f2")`` holds the keys of one chord together; ``type("text\\n")`` types
text one key (or shift + key) at a time with a pause between keys, which an installer
under TCG needs: Packer lost keystrokes without one. What a US keyboard cannot type is
refused, naming the character, before the first key goes out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from pyqvm.errors import SpecError
from pyqvm.machine import Machine
from pyqvm.state import VMState

#: Characters a US keyboard types without shift: character -> qcode.
_PLAIN: dict[str, str] = {c: c for c in "abcdefghijklmnopqrstuvwxyz0123456789"}
_PLAIN |= {
    " ": "spc", "\n": "ret", "\t": "tab", "-": "minus", "=": "equal", "[": "bracket_left",
    "]": "bracket_right", "\\": "backslash", ";": "semicolon", "'": "apostrophe",
    "`": "grave_accent", ",": "comma", ".": "dot", "/": "slash",
}  # fmt: skip
#: Characters typed with shift: character -> the qcode shifted.
_SHIFTED: dict[str, str] = {c.upper(): c for c in "abcdefghijklmnopqrstuvwxyz"}
_SHIFTED |= dict(zip("!@#$%^&*()", "1234567890", strict=True))
_SHIFTED |= {
    "_": "minus", "+": "equal", "{": "bracket_left", "}": "bracket_right", "|": "backslash",
    ":": "semicolon", '"': "apostrophe", "~": "grave_accent", "<": "comma", ">": "dot",
    "?": "slash",
}  # fmt: skip
#: What ``type`` sends for each character: (qcode, with shift).
US_KEYMAP: Mapping[str, tuple[str, bool]] = {
    **{c: (q, False) for c, q in _PLAIN.items()},
    **{c: (q, True) for c, q in _SHIFTED.items()},
}

#: Key names ``press`` takes besides the characters' qcodes: QEMU's, and common aliases.
_NAMED = {
    "shift", "shift_r", "alt", "alt_r", "ctrl", "ctrl_r", "meta_l", "meta_r", "menu", "esc",
    "ret", "spc", "tab", "backspace", "delete", "insert", "home", "end", "pgup", "pgdn",
    "up", "down", "left", "right", "caps_lock", "num_lock", "scroll_lock", "print", "sysrq",
    "pause", *(f"f{i}" for i in range(1, 13)),
}  # fmt: skip
ALIASES: Mapping[str, str] = {
    "enter": "ret", "return": "ret", "space": "spc", "escape": "esc", "control": "ctrl",
    "super": "meta_l", "win": "meta_l", "pageup": "pgup", "pagedown": "pgdn", "del": "delete",
    "bksp": "backspace",
}  # fmt: skip
KEY_NAMES = frozenset(_NAMED | set(_PLAIN.values()))
#: Seconds between two keys ``type`` sends.
TYPE_DELAY = 0.05


def chord(combo: str) -> list[str]:
    """``"ctrl-alt-f2"`` -> ``["ctrl", "alt", "f2"]`` (qcodes); `SpecError` for a name
    QEMU has no key for. ``-`` alone, or at the end (``ctrl--``), is the minus key."""
    parts = combo.lower().split("-")
    names = [p for p in parts if p]
    if combo.endswith("-"):
        names.append("minus")
    keys = []
    for name in names:
        key = ALIASES.get(name, _PLAIN.get(name, name))
        if key not in KEY_NAMES:
            raise SpecError(
                "keys", f"{name!r} in {combo!r} is not a key (e.g. ctrl, alt, f2, ret, a)"
            )
        keys.append(key)
    if not keys:
        raise SpecError("keys", "press needs at least one key, e.g. 'ret' or 'ctrl-alt-f2'")
    return keys


def keystrokes(text: str) -> list[list[str]]:
    """The chords that type ``text`` on a US keyboard; `SpecError` naming the first
    character it cannot type."""
    out = []
    for i, c in enumerate(text):
        if c not in US_KEYMAP:
            raise SpecError(
                f"text[{i}]", f"{c!r} cannot be typed with a US keymap; use press() for keys"
            )
        key, shifted = US_KEYMAP[c]
        out.append(["shift", key] if shifted else [key])
    return out


async def _send(vm: Machine, keys: list[str], hold_ms: int | None) -> None:
    args: dict[str, object] = {"keys": [{"type": "qcode", "data": k} for k in keys]}
    if hold_ms is not None:
        args["hold-time"] = hold_ms
    await vm.execute("send-key", args)


async def press(vm: Machine, combo: str, *, hold_ms: int | None = None) -> None:
    """Press the keys of ``combo`` together, then release them."""
    keys = chord(combo)
    vm.require(VMState.RUNNING, what="pressing keys")
    await _send(vm, keys, hold_ms)


async def type_text(vm: Machine, text: str, *, delay: float = TYPE_DELAY) -> None:
    """Type ``text`` (US keymap), ``delay`` seconds between keys."""
    strokes = keystrokes(text)
    vm.require(VMState.RUNNING, what="typing")
    for i, keys in enumerate(strokes):
        if i:
            await asyncio.sleep(delay)
        await _send(vm, keys, None)


__all__ = [
    "ALIASES",
    "KEY_NAMES",
    "TYPE_DELAY",
    "US_KEYMAP",
    "chord",
    "keystrokes",
    "press",
    "type_text",
]
