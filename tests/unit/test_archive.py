"""The Debian archive client against a signed test archive served on 127.0.0.1: what it
resolves, downloads and unpacks, and every bad input it refuses (issue 23)."""

from __future__ import annotations

import hashlib
import os
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pysequoia
import pytest
from fixtures.debarchive import FakePackage, MirrorServer, TestArchive, make_deb
from fixtures.smalldisk import run_on_small_disk

from pyqvm.errors import ArchiveError, SpecError
from pyqvm.image.archive import Archive, unpack
from pyqvm.image.archive import sources as archive_sources
from pyqvm.image.archive.sources import ArchiveConfig, Source

PACKAGES = [
    FakePackage(
        "app",
        "2.0",
        depends="libfoo (>= 1.1), virtual-thing, gone | libbar",
        files={"usr/bin/app": b"#!/bin/sh\necho app\n"},
    ),
    FakePackage("app", "1.0", files={"usr/bin/app": b"old"}),
    FakePackage("libfoo", "1.2", files={"usr/lib/libfoo.so.1": b"foo"}, compression="gz"),
    FakePackage("libbar", "3", arch="all", files={"usr/share/bar": b"bar"}, compression="zst"),
    FakePackage("provider", "1", provides="virtual-thing (= 2)", files={"etc/p": b"p"}),
    FakePackage("needs-v3", "1", depends="virtual-thing (>= 3)"),
    FakePackage("broken", "1", depends="nowhere"),
    # cloud-init's "fdisk | util-linux (<< 2.29.2-3~)": a newer util-linux does not do
    FakePackage("needs-old", "1", depends="libfoo (<< 1.0) | libbar"),
    FakePackage("core", "1", files={"bin/core": b"core"}),
]


@pytest.fixture
def archive(tmp_path: Path) -> TestArchive:
    test = TestArchive(tmp_path / "mirror")
    test.write(PACKAGES)
    return test


@pytest.fixture
def mirror(archive: TestArchive) -> Iterator[MirrorServer]:
    with MirrorServer(archive.root) as server:
        yield server


def client(url: str, keyring: Path, cache: Path, suite: str = "bookworm") -> Archive:
    return Archive(cache, ArchiveConfig((Source(url, suite),), (keyring,), "test"))


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def test_resolves_downloads_and_unpacks(
    archive: TestArchive, mirror: MirrorServer, cache: Path, tmp_path: Path
) -> None:
    a = client(mirror.url, archive.keyring, cache)
    assert a.candidates(["app"], "amd64")["app"].version == "2.0"  # the highest version
    closure = a.closure(["app"], "amd64")
    # libfoo by version, the virtual name by its provider, "gone | libbar" by libbar
    assert [p.name for p in closure] == ["app", "libfoo", "provider", "libbar"]
    debs = a.download(closure)
    for pkg, path in debs.items():
        assert (
            path.read_bytes()
            == archive.path_of(
                next(p for p in PACKAGES if (p.name, p.version) == (pkg.name, pkg.version))
            ).read_bytes()
        )
        assert path == cache / "downloads" / "sha256" / pkg.sha256
    root = tmp_path / "root"
    for path in debs.values():
        unpack(path, root)  # xz, gz and zstd data members
    assert (root / "usr/bin/app").read_bytes() == b"#!/bin/sh\necho app\n"
    assert os.access(root / "usr/bin/app", os.X_OK)
    assert (root / "usr/lib/libfoo.so.1").read_bytes() == b"foo"
    assert (root / "usr/share/bar").read_bytes() == b"bar"
    # A second client reads the cached indices and .debs: no index or pool request.
    mirror.requests.clear()
    again = client(mirror.url, archive.keyring, cache)
    again.download(again.closure(["app"], "amd64"))
    assert all(r.endswith("/InRelease") for r in mirror.requests), mirror.requests


def test_a_chosen_package_of_another_version_does_not_satisfy_an_alternative(
    archive: TestArchive, mirror: MirrorServer, cache: Path
) -> None:
    a = client(mirror.url, archive.keyring, cache)
    names = [p.name for p in a.closure(["libfoo", "needs-old"], "amd64")]
    assert names == ["libfoo", "needs-old", "libbar"]


def test_the_essential_set_is_what_the_index_marks(
    archive: TestArchive, mirror: MirrorServer, cache: Path
) -> None:
    archive.write(PACKAGES, essential=("core",))
    assert client(mirror.url, archive.keyring, cache).index("amd64").essential() == ["core"]


def test_a_versioned_dependency_on_a_virtual_name_needs_a_provided_version(
    archive: TestArchive, mirror: MirrorServer, cache: Path
) -> None:
    a = client(mirror.url, archive.keyring, cache)
    with pytest.raises(ArchiveError, match=r"needs-v3 1 depends on virtual-thing") as e:
        a.closure(["needs-v3"], "amd64")
    assert e.value.package == "needs-v3"


def test_a_missing_package_or_dependency_is_named(
    archive: TestArchive, mirror: MirrorServer, cache: Path
) -> None:
    a = client(mirror.url, archive.keyring, cache)
    with pytest.raises(ArchiveError, match=r"package 'no-such' is not in the archive") as e:
        a.candidates(["no-such"], "amd64")
    assert e.value.package == "no-such"
    with pytest.raises(ArchiveError, match=r"broken 1 depends on nowhere, which no suite"):
        a.closure(["broken"], "amd64")


# -- the release file -------------------------------------------------------------------


def test_an_altered_release_file_is_refused(
    archive: TestArchive, mirror: MirrorServer, cache: Path
) -> None:
    inrelease = archive.root / "dists/bookworm/InRelease"
    inrelease.write_bytes(inrelease.read_bytes().replace(b"Origin: pyqvm-test", b"Origin: evil"))
    with pytest.raises(ArchiveError, match="OpenPGP signature does not verify") as e:
        client(mirror.url, archive.keyring, cache).candidates(["app"], "amd64")
    assert e.value.url == f"{mirror.url}/dists/bookworm/InRelease"
    assert "PYQVM_DEBIAN_KEYRING" in str(e.value)


def test_an_unsigned_release_file_is_refused(
    archive: TestArchive, mirror: MirrorServer, cache: Path
) -> None:
    inrelease = archive.root / "dists/bookworm/InRelease"
    text = inrelease.read_text()
    body = text.split("\n\n", 1)[1].split("-----BEGIN PGP SIGNATURE-----")[0]
    inrelease.write_text(body)
    with pytest.raises(ArchiveError, match="OpenPGP signature does not verify"):
        client(mirror.url, archive.keyring, cache).candidates(["app"], "amd64")


def test_a_release_file_signed_by_another_key_is_refused(
    archive: TestArchive, mirror: MirrorServer, cache: Path
) -> None:
    stranger = pysequoia.Tsk.generate("stranger <s@pyqvm.invalid>")
    signed = (archive.root / "dists/bookworm/InRelease").read_bytes()
    body = pysequoia.verify(bytes=signed, store=lambda _ids: [archive.cert]).bytes
    assert body is not None
    archive.sign(archive.root / "dists/bookworm", body, stranger)
    with pytest.raises(ArchiveError, match="does not verify against Debian's archive keys"):
        client(mirror.url, archive.keyring, cache).candidates(["app"], "amd64")
    # Debian's own keys (shipped, no extra keyring) do not vouch for the test key either.
    archive.write(PACKAGES)
    no_extra = Archive(cache, ArchiveConfig((Source(mirror.url, "bookworm"),)))
    with pytest.raises(ArchiveError, match="does not verify"):
        no_extra.candidates(["app"], "amd64")


def test_an_expired_or_foreign_release_file_is_refused(
    archive: TestArchive, mirror: MirrorServer, cache: Path
) -> None:
    archive.write(PACKAGES, valid_until=TestArchive.expired())
    with pytest.raises(ArchiveError, match=r"expired on .*Valid-Until"):
        client(mirror.url, archive.keyring, cache).candidates(["app"], "amd64")
    archive.write(PACKAGES, valid_until=datetime.now(UTC) + timedelta(days=7))
    assert client(mirror.url, archive.keyring, cache).candidates(["app"], "amd64")
    archive.write(PACKAGES, codename="trixie")
    with pytest.raises(ArchiveError, match=r"release file of 'trixie', not 'bookworm'"):
        client(mirror.url, archive.keyring, cache).candidates(["app"], "amd64")


# -- indices and packages -----------------------------------------------------------------


def test_an_index_changed_by_one_byte_is_refused_and_not_kept(
    archive: TestArchive, mirror: MirrorServer, cache: Path
) -> None:
    index = archive.root / "dists/bookworm/main/binary-amd64/Packages.xz"
    data = bytearray(index.read_bytes())
    data[len(data) // 2] ^= 0x01
    index.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match=r"Packages\.xz: its SHA-256 is .* signed index"):
        client(mirror.url, archive.keyring, cache).candidates(["app"], "amd64")
    assert not list((cache / "archive" / "sha256").iterdir())


def test_a_deb_changed_by_one_byte_is_refused_and_not_kept(
    archive: TestArchive, mirror: MirrorServer, cache: Path
) -> None:
    deb = archive.path_of(PACKAGES[2])  # libfoo
    data = bytearray(deb.read_bytes())
    data[-3] ^= 0x01
    deb.write_bytes(bytes(data))
    a = client(mirror.url, archive.keyring, cache)
    with pytest.raises(ArchiveError, match=r"libfoo \(http://127\.0\.0\.1:\d+/pool/.*\): its "
                                           r"SHA-256 is") as e:  # fmt: skip
        a.download(a.closure(["app"], "amd64"))
    assert e.value.package == "libfoo"
    pkg = a.candidates(["libfoo"], "amd64")["libfoo"]
    assert not (cache / "downloads/sha256" / pkg.sha256).exists()
    assert not [p for p in (cache / "downloads/sha256").iterdir() if p.name.startswith(".")]


def test_a_truncated_download_is_refused(
    archive: TestArchive, mirror: MirrorServer, cache: Path
) -> None:
    mirror.faults["app_2.0_amd64.deb"] = "truncate"
    a = client(mirror.url, archive.keyring, cache)
    with pytest.raises(ArchiveError, match=r"app_2\.0_amd64\.deb\): got \d+ bytes of \d+: the "
                                           "download was cut short") as e:  # fmt: skip
        a.download([a.candidates(["app"], "amd64")["app"]])
    assert e.value.package == "app"
    assert not list((cache / "downloads/sha256").iterdir())


def test_a_short_file_on_the_mirror_is_refused(
    archive: TestArchive, mirror: MirrorServer, cache: Path
) -> None:
    deb = archive.path_of(PACKAGES[0])
    deb.write_bytes(deb.read_bytes()[:100])
    a = client(mirror.url, archive.keyring, cache)
    with pytest.raises(ArchiveError, match=r"app .*: got 100 bytes of \d+"):
        a.download([a.candidates(["app"], "amd64")["app"]])


@pytest.mark.parametrize(("status", "words"), [(404, "404 Not Found"), (500, "500 Internal")])
def test_an_error_status_names_the_url(
    archive: TestArchive, mirror: MirrorServer, cache: Path, status: int, words: str
) -> None:
    mirror.faults["/InRelease"] = status
    with pytest.raises(ArchiveError, match=f"the mirror answered {words}") as e:
        client(mirror.url, archive.keyring, cache).candidates(["app"], "amd64")
    assert e.value.url.endswith("/dists/bookworm/InRelease") and not e.value.unreachable
    mirror.faults.clear()
    mirror.faults["libfoo_1.2_amd64.deb"] = status
    a = client(mirror.url, archive.keyring, cache)
    with pytest.raises(ArchiveError, match=words) as e:
        a.download(a.closure(["app"], "amd64"))
    assert e.value.url.endswith("libfoo_1.2_amd64.deb")


def test_an_unreachable_mirror_is_an_error_until_a_release_file_is_cached(
    archive: TestArchive, cache: Path
) -> None:
    with MirrorServer(archive.root) as server:
        url = server.url
        with pytest.raises(ArchiveError, match="not in the archive"):
            # reads nothing yet: a missing package, but the release file and index get cached
            client(url, archive.keyring, cache / "warm").candidates(["nope"], "amd64")
        warm = client(url, archive.keyring, cache / "warm")
        warm.download(warm.closure(["app"], "amd64"))
    # The server is gone: nothing answers on its port.
    with pytest.raises(ArchiveError, match="the mirror is unreachable") as e:
        client(url, archive.keyring, cache / "cold").candidates(["app"], "amd64")
    assert e.value.unreachable
    offline = client(url, archive.keyring, cache / "warm")
    debs = offline.download(offline.closure(["app"], "amd64"))  # all from the cache
    assert len(debs) == 4


def test_a_full_disk_while_downloading_is_an_error_and_leaves_nothing(
    archive: TestArchive, mirror: MirrorServer, tmp_path: Path
) -> None:
    big = FakePackage("big", "1", files={"blob": os.urandom(1 << 20)}, compression="gz")
    archive.write([*PACKAGES, big])
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = textwrap.dedent(f"""
        from pathlib import Path
        from pyqvm.errors import ArchiveError
        from pyqvm.image.archive import Archive, ArchiveConfig, Source
        cache = Path({str(mnt)!r})
        source = Source({mirror.url!r}, "bookworm")
        a = Archive(cache, ArchiveConfig((source,), (Path({str(archive.keyring)!r}),)))
        try:
            a.download([a.candidates(["big"], "amd64")["big"]])
        except ArchiveError as e:
            print("ERROR", e)
        print("LEFT", sorted(p.name for p in (cache / "downloads/sha256").iterdir()))
    """)
    out = run_on_small_disk(mnt, "256k", script)
    assert "ERROR no space left on the device" in out, out
    assert "LEFT []" in out


# -- unpacking ------------------------------------------------------------------------------


def test_a_file_that_is_not_a_deb_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.deb"
    bad.write_bytes(b"not an ar archive")
    with pytest.raises(ArchiveError, match=r"bad\.deb is not an ar archive"):
        unpack(bad, tmp_path / "root")
    cut = tmp_path / "cut.deb"
    cut.write_bytes(make_deb(PACKAGES[0])[:-40])
    with pytest.raises(ArchiveError, match=r"cannot unpack .*cut\.deb"):
        unpack(cut, tmp_path / "root")


def test_unpack_keeps_members_inside_the_root(tmp_path: Path) -> None:
    evil = FakePackage("evil", files={"../escaped": b"x"})
    deb = tmp_path / "evil.deb"
    deb.write_bytes(make_deb(evil))
    with pytest.raises(ArchiveError, match="cannot unpack"):
        unpack(deb, tmp_path / "root")
    assert not (tmp_path / "escaped").exists()


# -- where the packages come from --------------------------------------------------------------


def test_sources_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    apt = tmp_path / "apt"
    apt.mkdir()
    (apt / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb-src\nURIs: http://src.example/debian\n"
        "Suites: bookworm\nComponents: main\n"
    )
    (apt / "security.list").write_text(
        "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://sec.example/debian-security "
        "bookworm-security main contrib\ndeb http://other.example/ubuntu jammy main\n"
    )
    config = tmp_path / "config.toml"
    env: dict[str, str] = {}
    # the host's apt: bookworm, its updates and security; nothing else
    got = archive_sources.load(env, config=config, apt=[apt])
    assert got.origin == "the host's apt sources"
    assert got.sources == (
        Source("http://mirror.example/debian", "bookworm"),
        Source("http://mirror.example/debian", "bookworm-updates"),
        Source("http://sec.example/debian-security", "bookworm-security"),
    )
    # no host apt: Debian's official mirror
    official = archive_sources.load(env, config=config, apt=[tmp_path / "none"])
    assert [s.suite for s in official.sources] == [
        "bookworm", "bookworm-updates", "bookworm-security"
    ]  # fmt: skip
    # the config file beats the host
    local = tmp_path / "local-mirror"
    local.mkdir()
    ring = tmp_path / "ring.asc"
    ring.write_text("x")
    config.write_text(f'[debian]\nmirror = "{local}"\nkeyring = "{ring}"\n')
    got = archive_sources.load(env, config=config, apt=[apt])
    assert got.sources == (Source(local.as_uri(), "bookworm"),)
    assert got.keyrings == (ring,) and got.origin == str(config)
    # the environment beats both
    env = {"PYQVM_DEBIAN_MIRROR": "https://m.example/d/", "PYQVM_DEBIAN_SECURITY": str(local)}
    got = archive_sources.load(env, config=config, apt=[apt])
    assert got.sources == (
        Source("https://m.example/d", "bookworm"),
        Source(local.as_uri(), "bookworm-security"),
    )
    assert got.origin == "PYQVM_DEBIAN_MIRROR"


@pytest.mark.parametrize(
    ("env", "toml", "match"),
    [
        ({"PYQVM_DEBIAN_MIRROR": "ftp://x"}, "", r"PYQVM_DEBIAN_MIRROR: 'ftp://x' is not a mirror"),
        ({"PYQVM_DEBIAN_MIRROR": "/no/such/dir"}, "", "is not a directory"),
        ({"PYQVM_DEBIAN_KEYRING": "/no/ring"}, "", "PYQVM_DEBIAN_KEYRING: no such keyring"),
        ({}, "[debian]\nmirorr = 'x'\n", r"unknown keys \['mirorr'\]"),
        ({}, "[debian\n", "cannot read the pyqvm config file"),
        ({}, "[debian]\nmirror = 3\n", r"debian\.mirror: must be a string"),
    ],
)
def test_bad_sources_are_spec_errors(
    tmp_path: Path, env: dict[str, str], toml: str, match: str
) -> None:
    config = tmp_path / "config.toml"
    if toml:
        config.write_text(toml)
    with pytest.raises(SpecError, match=match):
        archive_sources.load(env, config=config, apt=[])


def test_a_local_directory_is_a_mirror(archive: TestArchive, cache: Path) -> None:
    a = client(archive.root.as_uri(), archive.keyring, cache)
    debs = a.download(a.closure(["app"], "amd64"))
    assert {p.name for p in debs} == {"app", "libfoo", "provider", "libbar"}
    for pkg, path in debs.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == pkg.sha256


def test_debian_keys_ship_with_pyqvm() -> None:
    from pyqvm.image.archive import release

    names = [str(u) for c in release.trusted_certs() for u in c.user_ids]
    assert any("12/bookworm" in n and "Automatic Signing" in n for n in names)
    assert any("12/bookworm" in n and "Security" in n for n in names)
    assert release.SHIPPED_KEYRING.is_file()


def test_a_passing_network_failure_is_retried_and_an_answer_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The resolver's "try again" (EAI_AGAIN, as a busy DNS proxy answers) is retried, as
    apt's Acquire::Retries does; a name that does not exist fails at once."""
    import io
    import socket
    import urllib.error
    import urllib.request

    from pyqvm.image.archive import fetch

    monkeypatch.setattr(fetch, "RETRY_WAITS", (0.0, 0.0, 0.0, 0.0))
    calls: list[str] = []

    def flaky(url: str, timeout: float) -> io.BytesIO:
        calls.append(url)
        if len(calls) < 3:
            raise urllib.error.URLError(
                socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
            )
        return io.BytesIO(b"release")

    monkeypatch.setattr(fetch, "_urlopen", flaky)
    assert fetch.fetch_bytes("http://mirror.invalid/InRelease") == b"release"
    assert len(calls) == 3

    def missing(url: str, timeout: float) -> io.BytesIO:
        calls.append(url)
        raise urllib.error.URLError(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))

    calls.clear()
    monkeypatch.setattr(fetch, "_urlopen", missing)
    with pytest.raises(ArchiveError, match="unreachable"):
        fetch.fetch_bytes("http://mirror.invalid/InRelease")
    assert len(calls) == 1


def test_a_host_name_is_looked_up_once_for_every_file(
    archive: TestArchive, mirror: MirrorServer, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each file is a connection of its own, but not a DNS lookup of its own: a resolver that
    drops a query costs 5 s each time (~35 s of a debian build's downloads)."""
    import socket

    from pyqvm.image.archive import fetch

    monkeypatch.setattr(fetch, "_addresses", {}, raising=False)
    lookups: list[object] = []
    real = socket.getaddrinfo

    def counting(*args: Any, **kwargs: Any) -> Any:
        lookups.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", counting)
    a = client(mirror.url.replace("127.0.0.1", "localhost"), archive.keyring, cache)
    debs = a.download(a.closure(["app"], "amd64"))
    assert len(debs) == 4 and len(mirror.requests) >= 6  # release, index, four packages
    assert lookups.count("localhost") == 1
    # A host that no longer answers is looked up again on the next try.
    gone = real("127.0.0.1", 1, 0, socket.SOCK_STREAM)
    fetch._addresses[("localhost", 1)] = (time.monotonic(), gone)
    with pytest.raises(OSError):
        fetch._connect(("localhost", 1), 5.0)
    assert ("localhost", 1) not in fetch._addresses
