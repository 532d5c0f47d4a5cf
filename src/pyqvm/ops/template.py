"""Templates: a guest booted (and set up) once, frozen, and cloned in a blink.

Making a template (`create`) boots a VM whose RAM is a file
(``memory-backend-file,share=on``), runs the setup commands, syncs the
guest's disks, pauses it and saves its device state
with the ``x-ignore-shared`` migration capability: the RAM stays in the file
and is not copied at all (tens of KB of state). Its disk overlays become
read-only backing files. Everything goes into a temporary directory that is
renamed into place last, so a template is either complete or absent.

A clone (`clone_into`) is a new QEMU that maps the same file privately
(``share=off``: copy-on-write, its writes are its own), opens its own
overlays on the frozen disks, and loads the device state with ``-incoming``.
Then it is made its own: the guest clock is set and its kernel's random
generator is reseeded from fresh host entropy (`pyqvm.ops.wake`).

Templates live under the cache dir (``~/.cache/pyqvm/templates/NAME``) with
a record (`Template`) of the QEMU binary, machine, spec and image they were
made with; a clone refuses a template that no longer matches (`check`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyqvm import image
from pyqvm.argv.build import RamFile
from pyqvm.errors import MigrationError, PyqvmError, TemplateError
from pyqvm.files import locked_async
from pyqvm.host.accel import KvmStatus
from pyqvm.launch.plan import LaunchPlan
from pyqvm.machine import Machine
from pyqvm.ops import guest, wake
from pyqvm.ops.migration import MigrationTuning, check_accelerator, restore, save
from pyqvm.ops.migration.types import MANIFEST, STATE_FILE
from pyqvm.spec import VMSpec, check_id
from pyqvm.spec.io import spec_from_dict, spec_to_dict

log = logging.getLogger(__name__)

#: The version of a template's record; templates of another version are refused.
TEMPLATE_FORMAT = 3  # 2: the accelerator is recorded; 3: a pvpanic device (its device model)
RECORD = "template.json"
MEMORY = "memory"
STATE = "state"
CONSOLE = "console.log"
#: RAM stays in the shared file: only device state goes into the stream.
TUNING = MigrationTuning(capabilities={"x-ignore-shared": True})
_clones = itertools.count(1)


def templates_dir(directory: str | os.PathLike[str] | None = None) -> Path:
    """Where templates live: ``directory``, else ``$PYQVM_TEMPLATES_DIR``, else
    ``templates/`` in pyqvm's cache dir."""
    if directory is not None:
        return Path(directory)
    if env := os.environ.get("PYQVM_TEMPLATES_DIR"):
        return Path(env)
    return image.cache_dir() / "templates"


def spec_hash(spec: VMSpec) -> str:
    """A hash of what a spec says, its name aside (clones get names of their own)."""
    data = spec_to_dict(dataclasses.replace(spec, name="template"))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


@dataclass(frozen=True, slots=True)
class Template:
    """A frozen, ready guest on disk; clone it with `pyqvm.AsyncVM.from_template`."""

    name: str
    directory: Path
    spec: VMSpec
    spec_hash: str
    machine: str
    accelerator: str  # "kvm" or "tcg": the state loads only under the one it was made with
    qemu: str  # the binary's path
    qemu_version: str
    created: float
    stamps: dict[str, list[int]]  # path -> [size, mtime_ns] of every file a clone relies on

    @property
    def memory_file(self) -> Path:
        return self.directory / MEMORY

    @property
    def state_dir(self) -> Path:
        return self.directory / STATE

    def clone_spec(self, name: str | None = None) -> VMSpec:
        """The spec of a clone: the template's, named ``name`` (default: the template's
        name, this process and a counter, so clones never share a name)."""
        name = name or f"{self.name}-{os.getpid()}-{next(_clones)}"
        return dataclasses.replace(self.spec, name=name)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": TEMPLATE_FORMAT,
            "name": self.name,
            "spec": spec_to_dict(self.spec),
            "spec_hash": self.spec_hash,
            "machine": self.machine,
            "accelerator": self.accelerator,
            "qemu": self.qemu,
            "qemu_version": self.qemu_version,
            "created": self.created,
            "stamps": self.stamps,
        }

    @classmethod
    def from_json(cls, data: Any, directory: Path) -> Template:
        name = directory.name
        if not isinstance(data, dict) or data.get("format") != TEMPLATE_FORMAT:
            raise TemplateError(
                f"template {name!r} ({directory}) is of another pyqvm version or broken; "
                f"make it again: pyqvm template create --name {name}",
                name=name,
            )
        try:
            return cls(
                name=str(data["name"]),
                directory=directory,
                spec=spec_from_dict(data["spec"]),
                spec_hash=str(data["spec_hash"]),
                machine=str(data["machine"]),
                accelerator=str(data["accelerator"]),
                qemu=str(data["qemu"]),
                qemu_version=str(data["qemu_version"]),
                created=float(data["created"]),
                stamps={str(k): [int(x) for x in v] for k, v in data["stamps"].items()},
            )
        except (KeyError, TypeError, ValueError, PyqvmError) as e:
            raise TemplateError(
                f"template {name!r} ({directory}) has a broken record ({e}); make it again",
                name=name,
            ) from None

    def check(
        self,
        spec: VMSpec | None = None,
        *,
        kvm: KvmStatus | None = None,
        image_cache: Path | None = None,
    ) -> None:
        """Raise `TemplateError` unless a clone can use this template now.

        It must have been made from ``spec`` (if given), under the accelerator
        a clone gets here (``kvm``: this host's KVM status, probed if None),
        with the same QEMU binary and image files -- for the built-in guest,
        the newest image of its flavour in ``image_cache`` -- and all its files
        must be as they were written. Costs a few ``stat`` calls, no QEMU.
        """
        if spec is not None and spec_hash(spec) != self.spec_hash:
            raise TemplateError(
                f"template {self.name!r} was made from another spec; make it again for this one",
                name=self.name,
            )
        try:
            check_accelerator(self.accelerator, self.spec, kvm)
        except MigrationError as e:
            raise TemplateError(
                f"template {self.name!r}: {e}; make it again here", name=self.name
            ) from None
        if self.spec.image is not None:
            newest = image.find(self.spec.image, cache=image_cache, arch=self.spec.arch)
            if str(newest.kernel) not in self.stamps:
                raise TemplateError(
                    f"template {self.name!r} is stale: it was made with an older "
                    f"{self.spec.image!r} image than {newest.directory}; make it again",
                    name=self.name,
                )
        for path, stamp in self.stamps.items():
            p = Path(path)
            try:
                now = _stamp(p)
            except OSError:
                raise TemplateError(
                    f"template {self.name!r} is broken: '{p}' is missing; make it again",
                    name=self.name,
                ) from None
            if now != stamp:
                what = "QEMU" if path == self.qemu else f"'{p}'"
                raise TemplateError(
                    f"template {self.name!r} is stale: {what} changed since it was made "
                    f"(size/mtime {stamp} -> {now}); make it again",
                    name=self.name,
                )


def load(name: str, *, directory: str | os.PathLike[str] | None = None) -> Template:
    """The template called ``name``; `TemplateError` if there is none or it is broken."""
    where = templates_dir(directory) / name
    try:
        data = json.loads((where / RECORD).read_text())
    except FileNotFoundError:
        raise TemplateError(
            f"no template {name!r} in {templates_dir(directory)}; make it with "
            f"`pyqvm template create --name {name}`",
            name=name,
        ) from None
    except (OSError, ValueError) as e:
        raise TemplateError(f"template {name!r} is broken: {e}", name=name) from None
    return Template.from_json(data, where)


def list_templates(*, directory: str | os.PathLike[str] | None = None) -> list[Template]:
    """Every complete template, by name (half-made ones are never listed)."""
    base = templates_dir(directory)
    out = []
    for d in sorted(base.iterdir()) if base.is_dir() else ():
        if d.name.startswith(".") or not (d / RECORD).is_file():
            continue
        try:
            out.append(load(d.name, directory=directory))
        except TemplateError as e:
            log.warning("%s", e)
    return out


def remove(name: str, *, directory: str | os.PathLike[str] | None = None) -> None:
    """Delete template ``name`` (its clones that run keep their mapping of it)."""
    where = templates_dir(directory) / name
    if not where.is_dir():
        raise TemplateError(f"no template {name!r} in {templates_dir(directory)}", name=name)
    _remove_tree(where)


def _remove_tree(directory: Path) -> None:
    for p in directory.rglob("*"):  # the frozen files are read-only
        if p.is_file():
            p.chmod(0o644)
    shutil.rmtree(directory, ignore_errors=True)


def refuse_untemplatable(spec: VMSpec) -> None:
    """`TemplateError` for a spec that cannot be frozen and cloned, before QEMU starts."""
    if spec.host_devices:
        raise TemplateError(
            "host_devices: a VM with vfio-pci devices cannot be templated (their state "
            "lives in the hardware); remove them from the spec"
        )
    if spec.shares:
        raise TemplateError(
            "shares: a VM with shared folders cannot be templated (the guest's open files "
            "live in the share's server, which a clone cannot take over); remove them"
        )
    if any(n.mode == "private" for n in spec.networks):
        raise TemplateError(
            "networks: a VM on a private network cannot be templated (every clone would "
            "wake up with the template's address on the segment); leave the private "
            "network out of the template's spec"
        )
    if spec.ssh:
        raise TemplateError(
            "ssh: a VM with an SSH server cannot be templated yet (its clones would share "
            "the template's host key); leave ssh out of the template's spec"
        )
    if not spec.guest_agent:
        raise TemplateError(
            "guest_agent: a template's clones are made their own (clock, random seed) "
            "through the guest agent; set guest_agent = true"
        )
    if spec.max_memory is not None:
        raise TemplateError(
            "max_memory: hot-pluggable memory cannot be templated yet; remove "
            "max_memory and memory_slots"
        )


async def create(
    spec: VMSpec,
    name: str,
    *,
    setup: Sequence[str] = (),
    directory: str | os.PathLike[str] | None = None,
    image_cache: Path | None = None,
    replace: bool = False,
    timeout: float = 600.0,
) -> Template:
    """Boot ``spec``, run each ``setup`` command (``sh -c``), freeze it as template ``name``.

    Raises `TemplateError` (nothing is left behind) if the spec cannot be
    templated, the template exists (unless ``replace``), or a setup command
    fails; `LaunchError` if the guest does not boot. Replacing a template waits
    for clones that are starting from it.
    """
    return await _create(
        spec,
        name,
        setup=setup,
        directory=directory,
        image_cache=image_cache,
        replace=replace,
        timeout=timeout,
        locked=False,
    )


async def _create(
    spec: VMSpec,
    name: str,
    *,
    setup: Sequence[str] = (),
    directory: str | os.PathLike[str] | None = None,
    image_cache: Path | None = None,
    replace: bool,
    timeout: float = 600.0,
    locked: bool,
) -> Template:
    check_id(name, "name")
    refuse_untemplatable(spec)
    base = templates_dir(directory)
    final = base / name
    if final.exists() and not replace:
        raise TemplateError(
            f"template {name!r} exists ({final}); remove it or pass replace", name=name
        )
    base.mkdir(parents=True, exist_ok=True)
    work = base / f".tmp-{name}-{os.getpid()}"
    _remove_tree(work)
    work.mkdir()
    machine = Machine(dataclasses.replace(spec, name=f"template-{name}"), image_cache=image_cache)
    try:
        await machine.start(LaunchPlan(ram=RamFile(work / MEMORY, share=True)))
        for command in setup:
            result = await guest.run(machine, ["sh", "-c", command], timeout=timeout)
            if result.returncode != 0:
                raise TemplateError(
                    f"template {name!r}: setup command {command!r} exited "
                    f"{result.returncode}: {result.stderr_text.strip()[-400:]}",
                    name=name,
                )
        await guest.run(machine, ["sync"], timeout=timeout, check=True)
        if machine.wake_port is None:  # a guest without pyqvm-wake
            await wake.await_stale_seed(machine)
        version = (await machine.execute("query-version"))["qemu"]
        qemu = machine.argv[0]
        resolved = machine.resolved_spec
        # The template's boot is its clones' boot too: their console starts with it.
        console = machine.console_text() + f"\n--- pyqvm: frozen as template {name} ---\n"
        (work / CONSOLE).write_text(console)
        await save(machine, work / STATE, tuning=TUNING, timeout=timeout)
        frozen = [p for p in (work / STATE).iterdir() if p.suffix == ".qcow2"]
        for p in frozen:
            p.chmod(0o444)
        relied = [work / MEMORY, work / STATE / STATE_FILE, work / STATE / MANIFEST, *frozen]
        relied += [Path(qemu), *(d.path for d in resolved.disks)]
        if resolved.kernel is not None:
            relied.append(resolved.kernel.kernel)
            if resolved.kernel.initrd is not None:
                relied.append(resolved.kernel.initrd)
        stamps = {}
        for p in relied:
            # Recorded at their final place: the work dir is renamed below.
            final_path = final / p.relative_to(work) if p.is_relative_to(work) else p
            stamps[str(final_path)] = _stamp(p)
        template = Template(
            name=name,
            directory=final,
            spec=spec,
            spec_hash=spec_hash(spec),
            machine=resolved.effective_machine,
            accelerator=str(machine.accelerator),
            qemu=qemu,
            qemu_version=f"{version['major']}.{version['minor']}.{version['micro']}",
            created=time.time(),
            stamps=stamps,
        )
        (work / RECORD).write_text(json.dumps(template.to_json(), indent=2) + "\n")
        async with contextlib.nullcontext() if locked else _locked(base, name):
            if final.exists():
                _remove_tree(final)
            work.rename(final)
    except BaseException:
        await machine.kill()
        _remove_tree(work)
        raise
    log.info("template %s: made in %s", name, final)
    return template


async def ensure(
    spec: VMSpec,
    *,
    name: str | None = None,
    directory: str | os.PathLike[str] | None = None,
    image_cache: Path | None = None,
) -> Template:
    """The template of ``spec``: reused when it is current, else made, once across processes.

    ``name`` defaults to ``auto-<spec hash>``. A file lock in the templates dir
    makes concurrent callers (pytest-xdist workers) wait for the one that makes it.
    """
    name = name or f"auto-{spec_hash(spec)}"
    async with _locked(templates_dir(directory), name):
        try:
            template = load(name, directory=directory)
            template.check(spec, image_cache=image_cache)
            return template
        except TemplateError as e:
            log.info("template %s: %s; making it", name, e)
        return await _create(
            spec, name, directory=directory, image_cache=image_cache, replace=True, locked=True
        )


def _locked(base: Path, name: str, *, shared: bool = False) -> AbstractAsyncContextManager[None]:
    """Hold the lock of template ``name``: exclusive to make or replace it, shared to clone it.

    A clone holds it until its QEMU has mapped the memory file and read the
    state, so a stale template is never swapped out from under a clone that
    is starting (a running clone keeps its mapping of the old files).
    """
    base.mkdir(parents=True, exist_ok=True)
    waiting = f"template {name}: waiting for another process that uses it"
    lock = base / f".lock-{name}"
    return locked_async(lock, shared=shared, waiting=waiting, mode=0o644, logger=log)


def templatable(spec: VMSpec) -> bool:
    """Whether `create` would accept ``spec`` (see `refuse_untemplatable`)."""
    try:
        refuse_untemplatable(spec)
    except TemplateError:
        return False
    return True


def get(template: Template | str, *, directory: str | os.PathLike[str] | None = None) -> Template:
    """``template`` itself, or the template of that name (`load`)."""
    return load(template, directory=directory) if isinstance(template, str) else template


async def clone_into(machine: Machine, template: Template) -> None:
    """Start ``machine`` (created from the template's spec) as a clone of ``template``.

    Returns when the guest runs, with its clock set, fresh entropy in its
    random pool, and its agent answering. `TemplateError` for a stale or
    broken template (before QEMU starts); `MigrationError` with QEMU's stderr
    if QEMU refuses the state.
    """
    await restore_clone(machine, template)
    await make_own(machine)


async def restore_clone(machine: Machine, template: Template) -> None:
    """The first half of `clone_into`: QEMU runs the template's guest, which is not its
    own yet (the template's clock and random state). A pool's spare waits here, warmed,
    until `make_own` at its hand-out."""
    async with _locked(template.directory.parent, template.name, shared=True):
        template.check(
            machine.spec,
            kvm=machine.host.kvm if machine.host else None,
            image_cache=machine.image_cache,
        )
        try:
            console = (template.directory / CONSOLE).read_bytes()
        except OSError:
            console = b""
        console += f"--- pyqvm: {machine.name} cloned from template {template.name} ---\n".encode()
        await restore(
            machine,
            template.state_dir,
            tuning=TUNING,
            ram=RamFile(template.memory_file, share=False),
            console_prefix=console,
        )
    try:
        # The clone's RAM is its own now: a later migration or save must send it.
        await machine.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "x-ignore-shared", "state": False}]},
        )
    except BaseException:
        await machine.kill()
        raise
    log.info("%s: restored from template %s", machine.name, template.name)


async def make_own(machine: Machine) -> None:
    """The second half of `clone_into`: the clone gets the host's clock and a random
    generator of its own (`wake.make_own`); if that fails, QEMU is killed, since the
    guest would share the template's random key."""
    try:
        await wake.make_own(machine)
    except BaseException:
        await machine.kill()
        raise


__all__ = [
    "TEMPLATE_FORMAT",
    "Template",
    "clone_into",
    "create",
    "ensure",
    "get",
    "list_templates",
    "load",
    "make_own",
    "refuse_untemplatable",
    "remove",
    "restore_clone",
    "spec_hash",
    "templatable",
    "templates_dir",
]
