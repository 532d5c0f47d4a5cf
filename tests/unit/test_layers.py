"""The floors of ARCHITECTURE.md, checked on the imports of ``src/pyqvm`` (read with `ast`).

A module imports from its own floor or the floors below, never from a floor above; the whole
module graph has no cycle; a ``TYPE_CHECKING`` import is an import like any other (it must not
hide an upward edge); and no module reads or writes another module's private names.

The checkers are pure functions over parsed sources or an import graph, so the tests at the
bottom feed them synthetic code and show that each rule catches what it should.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
ROOT = "pyqvm"

# Bottom up. "pkg.*" places the package ``pkg`` and every module under it; any other entry
# places exactly that module. A module on no floor fails the test: place new modules here.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("pyqvm.errors", "pyqvm.state", "pyqvm.deadline", "pyqvm.codec", "pyqvm.files"),
    ("pyqvm.spec.*", "pyqvm.host.*"),
    ("pyqvm.argv.*", "pyqvm.image.*"),
    ("pyqvm.runtime.*",),
    ("pyqvm.launch.*", "pyqvm.channels.*"),
    ("pyqvm.machine",),
    ("pyqvm.ops.*",),
    ("pyqvm.vm",),
    (
        "pyqvm.faces.*",
        "pyqvm.named.*",
        "pyqvm.cli.*",
        "pyqvm.pytest_plugin",
        "pyqvm.pool",
        "pyqvm.imagebuild",
        "pyqvm",
        "pyqvm.__main__",
    ),
)
FACES = len(FLOORS) - 1  # the only floor allowed to import the re-exporting package root

# Never imported under TYPE_CHECKING below the faces: the faces, and the VM handle everything
# else sits under. (A face may: the package root's names and the CLI's verbs are imported
# lazily, for start-up time, and name their types for the checker that way.)
NOT_FOR_TYPE_CHECKING = ("pyqvm.vm", "pyqvm.faces", "pyqvm.cli", "pyqvm.pytest_plugin")

# Genuine exceptions to the private-name rule: {(module, attribute or name): reason}.
PRIVATE_ALLOWED: dict[tuple[str, str], str] = {
    ("pyqvm.runtime.children", "_exit"): "os._exit is the documented way out of a forked child",
    ("pyqvm.named.owner", "_exit"): "os._exit is the documented way out of a forked child",
    ("pyqvm.pool", "_driving"): "a pool's VMs run on the pool's loop: only a pool makes such a VM",
}


# -- reading sources -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    module: str
    is_package: bool
    tree: ast.Module
    path: str


@dataclass(frozen=True, slots=True)
class Import:
    """One pyqvm module named by an import statement."""

    target: str  # the module imported (``from a import b`` names a.b when b is a module)
    name: str | None  # the name taken from ``target`` (None: the module itself)
    line: int
    type_checking: bool


def parse(module: str, text: str, *, is_package: bool = False, path: str = "") -> Source:
    return Source(module, is_package, ast.parse(text, path or module), path or module)


def read_tree(src: Path = SRC) -> dict[str, Source]:
    """Every module under ``src/pyqvm``, by dotted name."""
    out = {}
    for file in sorted((src / ROOT).rglob("*.py")):
        parts = list(file.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        module = ".".join(parts)
        rel = str(file.relative_to(src.parent))
        out[module] = parse(module, file.read_text(), is_package=is_package, path=rel)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, tc: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    """Every node under ``node``, with whether it sits in an ``if TYPE_CHECKING:`` body."""
    yield node, tc
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        for stmt in node.body:
            yield from _walk(stmt, True)
        for stmt in node.orelse:
            yield from _walk(stmt, tc)
        return
    for child in ast.iter_child_nodes(node):
        yield from _walk(child, tc)


def _is_pyqvm(name: str) -> bool:
    return name == ROOT or name.startswith(ROOT + ".")


def _absolute(source: Source, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = source.module if source.is_package else source.module.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{node.module}" if node.module else base


def imports(source: Source, known: Sequence[str] | set[str]) -> Iterator[Import]:
    """The pyqvm imports of one module: top level, in functions, under TYPE_CHECKING."""
    for node, tc in _walk(source.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_pyqvm(alias.name):
                    yield Import(alias.name, None, node.lineno, tc)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(source, node)
            if not _is_pyqvm(base):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    yield Import(sub, None, node.lineno, tc)
                else:
                    yield Import(base, alias.name, node.lineno, tc)


def import_graph(sources: Mapping[str, Source]) -> dict[str, set[str]]:
    known = set(sources)
    return {m: {i.target for i in imports(s, known) if i.target != m} for m, s in sources.items()}


def edge_places(sources: Mapping[str, Source]) -> dict[tuple[str, str], str]:
    """``(module, target)`` -> where the import is, for readable messages."""
    known = set(sources)
    out: dict[tuple[str, str], str] = {}
    for m, s in sources.items():
        for i in imports(s, known):
            where = f"{s.path}:{i.line}" + (" under TYPE_CHECKING" if i.type_checking else "")
            out.setdefault((m, i.target), where)
    return out


# -- the layer rule --------------------------------------------------------------------------


def floor_of(module: str, floors: Sequence[Sequence[str]]) -> int | None:
    for level, patterns in enumerate(floors):
        for p in patterns:
            if p.endswith(".*"):
                if module == p[:-2] or module.startswith(p[:-1]):
                    return level
            elif module == p:
                return level
    return None


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one (Tarjan), as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(_path_in(graph, component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _path_in(graph: Mapping[str, set[str]], component: set[str]) -> list[str]:
    """A shortest closed path from the component's first module back to itself."""
    start = min(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, set()) & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle in component {component}")  # pragma: no cover


def check_layers(
    graph: Mapping[str, set[str]],
    floors: Sequence[Sequence[str]],
    where: Mapping[tuple[str, str], str] | None = None,
) -> list[str]:
    """Every breach of the floors in ``graph`` ({module: modules it imports}), as messages."""
    where = where or {}
    faces = len(floors) - 1
    out = []
    nodes = set(graph) | {t for targets in graph.values() for t in targets}
    for m in sorted(nodes):
        if floor_of(m, floors) is None:
            out.append(f"{m}: on no floor; place it in FLOORS (tests/unit/test_layers.py)")
    for m in sorted(graph):
        fm = floor_of(m, floors)
        for t in sorted(graph[m]):
            ft = floor_of(t, floors)
            if fm is None or ft is None:
                continue
            at = f" ({where[m, t]})" if (m, t) in where else ""
            if t == ROOT and fm != faces:
                out.append(
                    f"{m} (floor {fm}) imports the package root {ROOT!r}{at}; "
                    "import from the module that defines the name"
                )
            elif ft > fm:
                out.append(f"{m} (floor {fm}) imports {t} (floor {ft}){at}: upward")
    for path in cycles(graph):
        out.append("cycle: " + " -> ".join(path))
    return out


# -- the private-name rule -------------------------------------------------------------------


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _own_private_names(tree: ast.Module) -> set[str]:
    """Private names a module defines on its classes: methods, class attributes, self._x."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for stmt in node.body:
                targets: list[ast.expr] = []
                if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    out.add(stmt.name)
                elif isinstance(stmt, ast.Assign):
                    targets = stmt.targets
                elif isinstance(stmt, ast.AnnAssign):
                    targets = [stmt.target]
                out.update(t.id for t in targets if isinstance(t, ast.Name))
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
        ):
            out.add(node.attr)
    return {n for n in out if _is_private(n)}


def _is_own(expr: ast.expr) -> bool:
    """``self``, ``cls`` or ``super()``: the object whose class this code defines."""
    if isinstance(expr, ast.Name):
        return expr.id in ("self", "cls")
    return (
        isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id == "super"
    )


def _private_module_outside(module: str, target: str) -> bool:
    """``target`` lies in a private module (``a._b``) that ``module`` is not inside of ``a``."""
    parts = target.split(".")
    for i, part in enumerate(parts):
        if _is_private(part):
            parent = ".".join(parts[:i])
            return not (module == parent or module.startswith(parent + "."))
    return False


def private_access(
    sources: Mapping[str, Source], allowed: Mapping[tuple[str, str], str]
) -> list[str]:
    """Every read or write of another module's private name, as ``path:line: what``."""
    known = set(sources)
    out: list[tuple[str, int, str]] = []
    for m, s in sources.items():
        own = _own_private_names(s.tree)
        for i in imports(s, known):
            if _private_module_outside(m, i.target):
                out.append((s.path, i.line, f"imports from private module {i.target}"))
            elif i.name is not None and _is_private(i.name) and (m, i.name) not in allowed:
                out.append((s.path, i.line, f"imports private name {i.name} from {i.target}"))
        for node in ast.walk(s.tree):
            obj: ast.expr | None = None
            attr = ""
            if not isinstance(node, ast.expr):
                continue
            if isinstance(node, ast.Attribute):
                obj, attr = node.value, node.attr
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
            ):
                obj, attr = node.args[0], node.args[1].value
            if obj is None or not _is_private(attr) or _is_own(obj):
                continue
            if attr in own or (m, attr) in allowed:
                continue
            out.append((s.path, node.lineno, f"{ast.unparse(obj)}.{attr}: private to another"))
    return [f"{path}:{line}: {what}" for path, line, what in sorted(out)]


def type_checking_imports_of_faces(sources: Mapping[str, Source]) -> list[str]:
    known, out = set(sources), []
    for s in sources.values():
        if floor_of(s.module, FLOORS) == FACES:
            continue
        for i in imports(s, known):
            if i.type_checking and any(
                i.target == f or i.target.startswith(f + ".") for f in NOT_FOR_TYPE_CHECKING
            ):
                out.append(f"{s.path}:{i.line}: imports {i.target} under TYPE_CHECKING")
    return sorted(out)


# -- the tests on src/pyqvm ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree() -> dict[str, Source]:
    return read_tree()


def _fail_with(problems: list[str], what: str) -> None:
    if problems:
        pytest.fail(f"{len(problems)} {what}:\n" + "\n".join(problems), pytrace=False)


def test_imports_respect_the_floors_and_have_no_cycle(tree: dict[str, Source]) -> None:
    assert "pyqvm.spec" in tree and "pyqvm" in tree
    _fail_with(check_layers(import_graph(tree), FLOORS, edge_places(tree)), "layer breaches")


def test_no_module_touches_another_ones_private_names(tree: dict[str, Source]) -> None:
    _fail_with(private_access(tree, PRIVATE_ALLOWED), "private names used from outside")


def test_type_checking_never_imports_the_vm_or_a_face(tree: dict[str, Source]) -> None:
    _fail_with(type_checking_imports_of_faces(tree), "TYPE_CHECKING imports from above")


def test_the_allow_list_has_no_stale_entries(tree: dict[str, Source]) -> None:
    for module, name in PRIVATE_ALLOWED:
        assert module in tree, f"{module} is gone; drop its PRIVATE_ALLOWED entry"
        text = ast.unparse(tree[module].tree)
        assert name in text, f"{module} no longer uses {name}; drop its PRIVATE_ALLOWED entry"


# -- the checkers on synthetic code ----------------------------------------------------------

TC_VM = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pyqvm.vm import AsyncVM\n"


def synthetic(modules: Mapping[str, str], packages: Sequence[str] = ()) -> dict[str, Source]:
    return {m: parse(m, text, is_package=m in packages) for m, text in modules.items()}


CLEAN = {
    "pyqvm": "from pyqvm.faces import VM\nfrom pyqvm.vm import AsyncVM\nfrom pyqvm import image\n",
    "pyqvm.errors": "class PyqvmError(Exception): ...\n",
    "pyqvm.state": "from pyqvm.errors import PyqvmError\n",
    "pyqvm.spec": "from . import errors\n",
    "pyqvm.image": "from pyqvm.image import _build\nfrom ._build import build\n",
    "pyqvm.image._build": "import pyqvm.spec\nfrom pyqvm.errors import PyqvmError\n",
    "pyqvm.runtime.children": "from pyqvm.state import VMState\n",
    "pyqvm.channels.qmp": "from pyqvm.runtime import children\n",
    "pyqvm.machine": "from pyqvm.channels.qmp import Session\nfrom pyqvm import image\n",
    "pyqvm.ops": "import typing\nif typing.TYPE_CHECKING:\n    from pyqvm.machine import M\n",
    "pyqvm.ops.migration": "from ... import machine\nfrom .. import Op\n",
    "pyqvm.ops.migration.plan": "from pyqvm.ops.migration import x\nfrom ...spec import VMSpec\n",
    "pyqvm.vm": "from pyqvm.ops import migration\nfrom pyqvm.machine import Machine\n",
    "pyqvm.faces": "from pyqvm.vm import AsyncVM\n",
    "pyqvm.cli": "def main() -> None:\n    from pyqvm import image, VMSpec\n",
}
CLEAN_PACKAGES = ("pyqvm", "pyqvm.image", "pyqvm.ops", "pyqvm.ops.migration", "pyqvm.cli")


def test_a_clean_synthetic_graph_passes() -> None:
    sources = synthetic(CLEAN, CLEAN_PACKAGES)
    graph = import_graph(sources)
    assert graph["pyqvm.spec"] == {"pyqvm.errors"}  # relative, resolved
    assert graph["pyqvm.image"] == {"pyqvm.image._build"}  # a submodule, not its package
    assert graph["pyqvm.ops.migration"] == {"pyqvm.machine", "pyqvm.ops"}
    assert graph["pyqvm.ops.migration.plan"] == {"pyqvm.ops.migration", "pyqvm.spec"}
    assert graph["pyqvm.cli"] == {"pyqvm.image", "pyqvm"}  # found inside a function
    assert check_layers(graph, FLOORS) == []
    assert private_access(sources, {}) == []
    assert type_checking_imports_of_faces(sources) == []


@pytest.mark.parametrize(
    "ops_text",
    [
        TC_VM,  # hidden behind TYPE_CHECKING
        "from pyqvm.vm import AsyncVM\n",
        "def f() -> None:\n    import pyqvm.vm\n",  # inside a function
        "from ..vm import AsyncVM\n",  # relative
    ],
)
def test_an_upward_import_is_reported(ops_text: str) -> None:
    sources = synthetic({**CLEAN, "pyqvm.ops.hotplug": ops_text}, CLEAN_PACKAGES)
    assert check_layers(import_graph(sources), FLOORS) == [
        "pyqvm.ops.hotplug (floor 6) imports pyqvm.vm (floor 7): upward"
    ]


def test_the_place_of_an_upward_import_is_named() -> None:
    sources = synthetic({**CLEAN, "pyqvm.ops.hotplug": TC_VM}, CLEAN_PACKAGES)
    assert check_layers(import_graph(sources), FLOORS, edge_places(sources)) == [
        "pyqvm.ops.hotplug (floor 6) imports pyqvm.vm (floor 7) "
        "(pyqvm.ops.hotplug:3 under TYPE_CHECKING): upward"
    ]
    assert type_checking_imports_of_faces(sources) == [
        "pyqvm.ops.hotplug:3: imports pyqvm.vm under TYPE_CHECKING"
    ]


def test_an_import_of_the_package_root_below_the_faces_is_reported() -> None:
    sources = synthetic(
        {**CLEAN, "pyqvm.ops.hotplug": "from pyqvm import VMSpec\n"}, CLEAN_PACKAGES
    )
    assert check_layers(import_graph(sources), FLOORS) == [
        "pyqvm.ops.hotplug (floor 6) imports the package root 'pyqvm'; "
        "import from the module that defines the name"
    ]


def test_a_cycle_within_a_floor_is_reported() -> None:
    graph = {
        "pyqvm.errors": set(),
        "pyqvm.channels.agent": {"pyqvm.launch.seed", "pyqvm.errors"},
        "pyqvm.launch.seed": {"pyqvm.channels.qmp"},
        "pyqvm.channels.qmp": {"pyqvm.channels.agent"},
        "pyqvm.launch.resolve": {"pyqvm.launch.resolve"},
    }
    assert check_layers(graph, FLOORS) == [
        "cycle: pyqvm.channels.agent -> pyqvm.launch.seed -> pyqvm.channels.qmp "
        "-> pyqvm.channels.agent",
        "cycle: pyqvm.launch.resolve -> pyqvm.launch.resolve",
    ]


def test_a_cycle_across_floors_is_reported_with_its_upward_edge() -> None:
    sources = synthetic({**CLEAN, "pyqvm.ops": TC_VM}, CLEAN_PACKAGES)
    assert check_layers(import_graph(sources), FLOORS) == [
        "pyqvm.ops (floor 6) imports pyqvm.vm (floor 7): upward",
        "cycle: pyqvm.ops -> pyqvm.vm -> pyqvm.ops.migration -> pyqvm.ops",
    ]


def test_an_unplaced_module_is_reported() -> None:
    graph = {"pyqvm.errors": set(), "pyqvm.mystery": {"pyqvm.errors"}, "pyqvm.vm": {"pyqvm.xyz"}}
    assert check_layers(graph, FLOORS) == [
        "pyqvm.mystery: on no floor; place it in FLOORS (tests/unit/test_layers.py)",
        "pyqvm.xyz: on no floor; place it in FLOORS (tests/unit/test_layers.py)",
    ]
    assert floor_of("pyqvm.hostile", FLOORS) is None  # "pyqvm.host.*" is not a prefix match
    assert floor_of("pyqvm.host", FLOORS) == floor_of("pyqvm.host.facts", FLOORS) == 1


def test_private_names_from_another_module_are_reported() -> None:
    sources = synthetic(
        {
            "pyqvm.host.facts": "def _find(): ...\n",
            "pyqvm.host.doctor": "from pyqvm.host.facts import _find, find\n",
            "pyqvm.image": "",
            "pyqvm.image._build": "",
            "pyqvm.cli": "from pyqvm.image import _build\nfrom pyqvm.image._build import build\n",
            "pyqvm.ops.migration": (
                "def f(vm, other):\n"
                "    vm._set_state(1)\n"
                "    other._process = None\n"
                "    return getattr(vm, '_spec')\n"
            ),
        },
        ("pyqvm.image", "pyqvm.cli"),
    )
    assert private_access(sources, {}) == [
        "pyqvm.cli:1: imports from private module pyqvm.image._build",
        "pyqvm.cli:2: imports from private module pyqvm.image._build",
        "pyqvm.host.doctor:1: imports private name _find from pyqvm.host.facts",
        "pyqvm.ops.migration:2: vm._set_state: private to another",
        "pyqvm.ops.migration:3: other._process: private to another",
        "pyqvm.ops.migration:4: vm._spec: private to another",
    ]
    allowed = {("pyqvm.ops.migration", "_spec"): "a reason"}
    assert "pyqvm.ops.migration:4: vm._spec: private to another" not in private_access(
        sources, allowed
    )


def test_own_private_names_are_fine() -> None:
    text = (
        "class Store:\n"
        "    _cache: dict = {}\n"
        "    def __init__(self):\n"
        "        self._items = []\n"
        "        self.__dict__\n"
        "    def _update(self): ...\n"
        "    def merge(self, other: 'Store'):\n"
        "        self._items += other._items\n"
        "        other._update()\n"
        "        return super()._x, cls._y, type(self)._cache\n"
    )
    sources = synthetic(
        {
            "pyqvm.host.claims": text,
            "pyqvm.image": "from pyqvm.image import _build\nfrom . import _cpio\n",
            "pyqvm.image._build": "from pyqvm.image._cpio import Writer\n",
            "pyqvm.image._cpio": "",
        },
        ("pyqvm.image",),
    )
    assert private_access(sources, {}) == []


# -- docs/architecture.md ---------------------------------------------------------------------


def documented_floors(text: str) -> tuple[tuple[str, ...], ...]:
    """The floors table of docs/architecture.md, as `FLOORS` writes it: the backticked
    names of its second column (``spec/`` is ``pyqvm.spec.*``), row by row."""
    rows: dict[int, tuple[str, ...]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].isdigit():
            names = re.findall(r"`([^`]+)`", cells[1])
            rows[int(cells[0])] = tuple(
                "pyqvm" if n == "pyqvm"
                else f"pyqvm.{n[:-1]}.*" if n.endswith("/")
                else f"pyqvm.{n}"
                for n in names
            )  # fmt: skip
    return tuple(rows[i] for i in sorted(rows))


def test_docs_architecture_shows_the_floors_this_test_enforces() -> None:
    text = (SRC.parent / "docs" / "architecture.md").read_text()
    assert documented_floors(text) == FLOORS


def test_a_floor_table_that_drifted_is_caught() -> None:
    table = "| floor | modules | owns |\n|---|---|---|\n| 0 | `errors`, `state` | x |\n"
    assert documented_floors(table) == (("pyqvm.errors", "pyqvm.state"),) != FLOORS
    assert documented_floors("| 1 | `spec/`, `host/` | y |") == (("pyqvm.spec.*", "pyqvm.host.*"),)
