"""Packages indices: the candidate of a name, and the closure of a set of packages.

An index is split into its paragraphs once (fast: one split and one line per
paragraph); a paragraph is parsed by python-debian only when its package is
asked for. The candidate of a name is its highest version over every suite
read, as apt's default policy chooses; a virtual name is satisfied by the
packages that provide it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from debian import deb822
from debian.debian_support import Version

from pyqvm.errors import ArchiveError

#: Relation operators -> what `Version` comparison must give.
_OPS: dict[str, Callable[[int], bool]] = {
    "<<": lambda c: c < 0,
    "<=": lambda c: c <= 0,
    "=": lambda c: c == 0,
    ">=": lambda c: c >= 0,
    ">>": lambda c: c > 0,
}


def _compare(a: str, b: str) -> int:
    va, vb = Version(a), Version(b)
    return (va > vb) - (va < vb)


@dataclass(frozen=True, slots=True)
class Package:
    """One binary package of the archive, as its verified index describes it."""

    name: str
    version: str
    arch: str
    filename: str  # its path in the pool, relative to the archive's URI
    sha256: str
    size: int
    uri: str  # the archive that serves it
    depends: str = ""  # Pre-Depends and Depends, as one relation list
    provides: str = ""
    essential: bool = False
    priority: str = ""

    @property
    def deb_name(self) -> str:
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"

    @property
    def url(self) -> str:
        return f"{self.uri}/{self.filename}"


def _package(para: bytes, uri: str) -> Package:
    fields = deb822.Packages(para)
    try:
        depends = ", ".join(v for k in ("Pre-Depends", "Depends") if (v := fields.get(k)))
        return Package(
            name=fields["Package"],
            version=fields["Version"],
            arch=fields["Architecture"],
            filename=fields["Filename"],
            sha256=fields["SHA256"].lower(),
            size=int(fields["Size"]),
            uri=uri,
            depends=depends,
            provides=fields.get("Provides", ""),
            essential=fields.get("Essential", "no") == "yes",
            priority=fields.get("Priority", ""),
        )
    except (KeyError, ValueError) as e:
        name = fields.get("Package", "?")
        raise ArchiveError(
            f"the index entry of {name} from {uri} lacks {e}", package=name
        ) from None


def _relations(text: str) -> list[list[Any]]:
    """A relation field as python-debian parses it, with no empty relation."""
    cleaned = ", ".join(part for part in text.split(",") if part.strip())
    return deb822.PkgRelation.parse_relations(cleaned) if cleaned else []


class PackageIndex:
    """Every package of some Packages indices (one per suite), by name and by what they
    provide."""

    def __init__(self, arch: str) -> None:
        self.arch = arch
        self._raw: dict[str, list[tuple[bytes, str]]] = defaultdict(list)
        # virtual name -> (the providing package, the version it provides, if any)
        self._providers: dict[str, list[tuple[str, str | None]]] = defaultdict(list)
        self._parsed: dict[str, list[Package]] = {}

    def add(self, text: bytes, uri: str) -> None:
        """Add the paragraphs of one (verified, decompressed) Packages index from ``uri``."""
        for para in text.split(b"\n\n"):
            para = para.strip(b"\n")
            if not para.startswith(b"Package:"):
                continue
            name = para[8 : para.find(b"\n")].strip().decode()
            self._raw[name].append((para, uri))
            if (at := para.find(b"\nProvides:")) >= 0:
                end = para.find(b"\n", at + 1)
                line = para[at + 10 : end if end >= 0 else None].decode()
                for item in line.split(","):
                    virtual, _, version = item.partition("(")
                    if virtual.strip():
                        provided = version.strip(" )").removeprefix("=").strip() or None
                        self._providers[virtual.strip()].append((name, provided))
        self._parsed.clear()

    def essential(self) -> list[str]:
        """The names of the packages marked ``Essential: yes`` (in index order)."""
        return [
            name
            for name, paras in self._raw.items()
            if any(b"\nEssential: yes" in para for para, _ in paras) and self.versions(name)
        ]

    def versions(self, name: str) -> list[Package]:
        """Every version of ``name`` for this arch (or ``all``), highest first."""
        if name not in self._parsed:
            found = [_package(para, uri) for para, uri in self._raw.get(name, ())]
            found = [p for p in found if p.arch in (self.arch, "all")]
            found.sort(key=lambda p: Version(p.version), reverse=True)
            self._parsed[name] = found
        return self._parsed[name]

    def candidate(self, name: str) -> Package:
        """The highest version of ``name``; `ArchiveError` when no suite has it."""
        found = self.versions(name)
        if not found:
            raise ArchiveError(
                f"package {name!r} is not in the archive's indices for {self.arch} "
                "(the mirror may not carry Debian 12's main component for this arch)",
                package=name,
            )
        return found[0]

    def _satisfying(self, name: str, op: str | None, version: str | None) -> Package | None:
        for pkg in self.versions(name):
            if op is None or version is None or _OPS[op](_compare(pkg.version, version)):
                return pkg
        # A virtual name: the first package that provides it (at a version that fits).
        for provider, provided in self._providers.get(name, ()):
            fits = op is None or (
                provided is not None and version is not None
                and _OPS[op](_compare(provided, version))
            )  # fmt: skip
            if fits and self.versions(provider):
                return self.versions(provider)[0]
        return None

    @staticmethod
    def _chosen_fits(chosen: dict[str, Package], alt: dict[str, Any]) -> bool:
        """Whether a package already chosen satisfies the relation ``alt`` (its version
        constraint included: ``util-linux (<< 2.29.2-3~)`` is not met by a newer one)."""
        pkg = chosen.get(alt["name"])
        if pkg is None:
            return False
        op, version = alt.get("version") or (None, None)
        return op is None or version is None or _OPS[op](_compare(pkg.version, version))

    def closure(
        self, names: Iterable[str], *, follow: Callable[[Package], bool] = lambda _p: True
    ) -> list[Package]:
        """``names``' candidates and, recursively, the packages their dependencies (Depends,
        Pre-Depends) need, taking the first satisfiable alternative of each; a dependency
        for which ``follow`` is false is neither added nor followed."""
        todo = [self.candidate(n) for n in names]
        chosen: dict[str, Package] = {}
        while todo:
            pkg = todo.pop(0)
            if pkg.name in chosen:
                continue
            chosen[pkg.name] = pkg
            for alternatives in _relations(pkg.depends):
                if any(self._chosen_fits(chosen, a) for a in alternatives):
                    continue
                pick = None
                for alt in alternatives:
                    op, version = alt.get("version") or (None, None)
                    if (pick := self._satisfying(alt["name"], op, version)) is not None:
                        break
                if pick is None:
                    wanted = " | ".join(a["name"] for a in alternatives)
                    raise ArchiveError(
                        f"{pkg.name} {pkg.version} depends on {wanted}, which no suite of "
                        "the archive satisfies",
                        package=pkg.name,
                    )
                if follow(pick):
                    todo.append(pick)
        return list(chosen.values())


__all__ = ["Package", "PackageIndex"]
