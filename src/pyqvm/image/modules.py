"""Kernel module bookkeeping: modules.dep / modules.builtin parsing and dependency order."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")


def module_name(path: str) -> str:
    """``kernel/drivers/char/hw_random/virtio-rng.ko.xz`` -> ``virtio_rng``."""
    base = path.rsplit("/", 1)[-1]
    for suffix in _SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, ...]]:
    """modules.dep -> {module path: paths it depends on (depmod's load order, last first)}."""
    deps: dict[str, tuple[str, ...]] = {}
    for line in text.splitlines():
        path, sep, rest = line.partition(":")
        if sep:
            deps[path.strip()] = tuple(rest.split())
    return deps


def parse_modules_builtin(text: str) -> frozenset[str]:
    """modules.builtin -> the names of the modules built into the kernel."""
    return frozenset(module_name(line.strip()) for line in text.splitlines() if line.strip())


#: modules.txt's word for a module packed into the image but loaded only when used
#: (the share file systems: loading them at every boot would cost every boot).
ON_DEMAND = "on-demand"


def _entries(text: str, flavour: str) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        flavours = [w for w in words[1:] if w != ON_DEMAND]
        if not flavours or flavour in flavours:
            out.append((module_name(words[0]), ON_DEMAND in words[1:]))
    return out


def parse_module_list(text: str, flavour: str) -> tuple[str, ...]:
    """The recipe's modules.txt: ``NAME [FLAVOUR...] [on-demand]`` lines; no flavour
    means all."""
    return tuple(dict.fromkeys(name for name, _ in _entries(text, flavour)))


def on_demand_modules(text: str, flavour: str) -> frozenset[str]:
    """The modules of modules.txt marked ``on-demand``: packed, not loaded at boot."""
    return frozenset(name for name, demand in _entries(text, flavour) if demand)


@dataclass(frozen=True, slots=True)
class ModulePlan:
    """What to put in the initramfs for a list of wanted modules.

    ``load`` are the wanted names that are loadable modules (give them to
    modprobe); ``files`` every module path needed, dependencies first.
    """

    load: tuple[str, ...]
    files: tuple[str, ...]
    builtin: tuple[str, ...]
    missing: tuple[str, ...]


def plan_modules(
    wanted: Iterable[str], deps: Mapping[str, tuple[str, ...]], builtin: frozenset[str]
) -> ModulePlan:
    """Which of ``wanted`` to load, the module files they need, which are built in or absent."""
    by_name = {module_name(path): path for path in deps}
    load: list[str] = []
    built: list[str] = []
    missing: list[str] = []
    files: dict[str, None] = {}

    def visit(path: str, stack: tuple[str, ...]) -> None:
        if path in files or path in stack:
            return
        for dep in deps.get(path, ()):
            visit(dep, (*stack, path))
        files[path] = None

    for raw in wanted:
        name = module_name(raw)
        if name in builtin:
            built.append(name)
        elif name in by_name:
            load.append(name)
            visit(by_name[name], ())
        else:
            missing.append(name)
    return ModulePlan(tuple(load), tuple(files), tuple(built), tuple(missing))


# A modalias pattern init can put in a shell `case` as it is: glob characters and the
# punctuation of bus aliases (pci:v00001AF4d*sv*, acpi*:LNRO0005:*, of:N*T*Cvirtio,mmio).
_SAFE_PATTERN = re.compile(r"[A-Za-z0-9_:*?,.+-]+")
# Aliases with a colon that name no device: a /dev node, a symbol.
_NOT_DEVICES = ("devname:", "symbol:")


def parse_modules_alias(text: str) -> list[tuple[str, str]]:
    """modules.alias -> (pattern, module name) pairs, in the file's order."""
    pairs: list[tuple[str, str]] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "alias":
            pairs.append((words[1], module_name(words[2])))
    return pairs


@dataclass(frozen=True, slots=True)
class BootModules:
    """How init loads the modules it loads at boot.

    ``drivers`` are device drivers, as (modalias pattern, module) pairs: init loads one
    only when a device it drives is there (or comes, on hotplug). ``always`` drive no
    device a modalias names (a library, a file system): init loads them at every boot.
    """

    drivers: tuple[tuple[str, str], ...]
    always: tuple[str, ...]


def boot_modules(at_boot: Iterable[str], aliases: Iterable[tuple[str, str]]) -> BootModules:
    """Sort the modules init loads at boot into device drivers (by their device aliases,
    from `parse_modules_alias`) and the rest."""
    wanted = tuple(dict.fromkeys(at_boot))
    drivers = tuple(
        (pattern, module)
        for pattern, module in aliases
        if module in wanted
        and ":" in pattern
        and not pattern.startswith(_NOT_DEVICES)
        and _SAFE_PATTERN.fullmatch(pattern)
    )
    driven = {module for _, module in drivers}
    return BootModules(drivers, tuple(m for m in wanted if m not in driven))
