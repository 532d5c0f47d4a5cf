"""The sync facade and the CLI stay thin and in step with the async core."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from pyqvm.cli import parse_args, spec_from_args
from pyqvm.errors import PyqvmError
from pyqvm.sync import VM
from pyqvm.vm import AsyncVM


def public(cls: type) -> dict[str, object]:
    return {n: getattr(cls, n) for n in dir(cls) if not n.startswith("_")}


def test_sync_and_async_expose_the_same_api() -> None:
    a, s = public(AsyncVM), public(VM)
    # The async face hands out its machine, QMP session and agent; the sync face wraps their
    # calls instead.
    assert set(a) - {"machine", "qmp", "agent"} == set(s)
    for name in set(a) & set(s):
        if callable(a[name]) and not isinstance(a[name], property):
            pa = list(inspect.signature(a[name]).parameters)  # type: ignore[arg-type]
            ps = list(inspect.signature(s[name]).parameters)  # type: ignore[arg-type]
            assert pa == ps, name


def test_sync_and_async_have_the_same_constructor_and_properties() -> None:
    assert inspect.signature(AsyncVM.__init__) == inspect.signature(VM.__init__)
    props_a = {n for n, v in public(AsyncVM).items() if isinstance(v, property)}
    props_s = {n for n, v in public(VM).items() if isinstance(v, property)}
    assert props_a - {"machine", "qmp", "agent"} == props_s


def args(*argv: str) -> object:
    return parse_args(["run", *argv])


def test_cli_defaults_to_builtin_guest_with_a_nic() -> None:
    spec = spec_from_args(args("--", "true"))  # type: ignore[arg-type]
    assert spec.image == "default" and len(spec.networks) == 1
    spec = spec_from_args(args("--profile", "emulated", "--net", "none"))  # type: ignore[arg-type]
    assert spec.image == "full" and spec.networks == ()
    spec = spec_from_args(args("--forward", "2222:22", "-m", "1G"))  # type: ignore[arg-type]
    assert spec.networks[0].forwards[0].host_port == 2222 and spec.memory == 1024


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        (["run", "--", "true"], 0),
        (["-v", "run", "--", "true"], 1),
        (["run", "-v", "--", "true"], 1),
        (["run", "-vv", "--", "-v"], 2),  # after --, -v belongs to the guest command
        (["-v", "cmdline", "-v"], 1),
        (["doctor", "-vv"], 2),
        (["image", "build", "-v"], 1),
        (["image", "list"], 0),
        (["image", "prune", "--dry-run", "-v"], 1),
    ],
)
def test_cli_verbosity_before_or_after_the_subcommand(argv: list[str], level: int) -> None:
    assert parse_args(argv).verbose == level


def test_cli_spec_file_and_kernel(files: dict[str, Path], tmp_path: Path) -> None:
    toml = tmp_path / "vm.toml"
    toml.write_text('memory = "1G"\nkernel = "vmlinuz"\n')
    spec = spec_from_args(args(str(toml), "--smp", "2"))  # type: ignore[arg-type]
    assert spec.image is None and spec.smp == 2 and spec.memory == 1024
    assert spec.networks == ()  # a spec file says what NICs it wants
    with pytest.raises(PyqvmError, match="HOST:GUEST"):
        spec_from_args(args("--forward", "22"))  # type: ignore[arg-type]


def test_the_package_root_lazy_table_matches_its_type_checking_imports() -> None:
    """`pyqvm.__getattr__` imports on first use; the checker reads the TYPE_CHECKING block.
    Every name of ``__all__`` is in that block and resolves to the object it names."""
    import ast

    import pyqvm

    tree = ast.parse(Path(pyqvm.__file__).read_text())
    checked: dict[str, tuple[str, str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom) and stmt.module
                for alias in stmt.names:
                    checked[alias.asname or alias.name] = (stmt.module, alias.name)
    assert set(checked) == set(pyqvm.__all__)
    for name, (module, attr) in checked.items():
        import importlib

        expected = getattr(importlib.import_module(module), attr, None)
        if expected is None:  # `from pyqvm.ops import template as templates`: a module
            expected = importlib.import_module(f"{module}.{attr}")
        assert getattr(pyqvm, name) is expected, name


def test_named_vm_faces_expose_the_same_api() -> None:
    from pyqvm.named.client import AsyncNamedVM
    from pyqvm.remote import NamedVM

    a, s = public(AsyncNamedVM), public(NamedVM)
    # The async handle holds a connection (close, call, events, entry); the blocking one
    # connects per call and keeps only a name and a timeout.
    assert set(a) - {"attach", "close", "call", "events", "entry", "name"} == set(s) - {
        "timeout",
        "name",
    }
    for name in set(a) & set(s):
        if callable(a[name]) and not isinstance(a[name], property):
            pa = list(inspect.signature(a[name]).parameters)  # type: ignore[arg-type]
            ps = list(inspect.signature(s[name]).parameters)  # type: ignore[arg-type]
            assert pa == ps, name
