"""Encrypted migration between two "hosts": network namespaces joined by veth pairs.

Host A (the source) is joined to B (a good destination) and to C (a destination whose
certificate comes from another CA). Only loopback and the addresses of these namespaces
are ever used. Each side is a pyqvm process of its own started with ``ip netns exec``
(`tests/e2e/_tls_peer.py`), as a user would run the two halves on two machines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.pki import CA, gnutls_dn

from pyqvm import AsyncVM, MigrationError, MigrationTLS, Template, VMSpec, VMState

pytestmark = [pytest.mark.e2e]

PEER = Path(__file__).with_name("_tls_peer.py")
SRC = Path(__file__).resolve().parents[2] / "src"
A_B, B = "10.213.0.1", "10.213.0.2"  # the A-B link
A_C, C = "10.213.1.1", "10.213.1.2"  # the A-C link


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def hosts() -> Iterator[dict[str, str]]:
    """Namespaces A, B and C (names unique to this run), A linked to B and to C."""
    tag = f"{os.getpid() % 100000}"
    ns = {h: f"pq{tag}{h}" for h in "abc"}
    try:
        for name in ns.values():
            ip("netns", "add", name)
            ip("-n", name, "link", "set", "lo", "up")
        for peer, (mine, theirs) in (("b", (A_B, B)), ("c", (A_C, C))):
            a_end, p_end = f"pq{tag}a{peer}", f"pq{tag}{peer}a"
            ip("link", "add", a_end, "netns", ns["a"], "type", "veth", "peer", "name", p_end,
               "netns", ns[peer])  # fmt: skip
            ip("-n", ns["a"], "addr", "add", f"{mine}/24", "dev", a_end)
            ip("-n", ns[peer], "addr", "add", f"{theirs}/24", "dev", p_end)
            ip("-n", ns["a"], "link", "set", a_end, "up")
            ip("-n", ns[peer], "link", "set", p_end, "up")
        yield ns
    finally:
        for name in ns.values():
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    good, rogue = CA("pyqvm test CA"), CA("rogue CA")
    return {
        "b": good.issue(d / "b", "pqB", server_ips=(B,)),
        "a": good.issue(d / "a", "pqA"),
        "c": rogue.issue(d / "c", "pqC", server_ips=(C,)),
    }


def peer(ns: str, request: dict[str, object]) -> subprocess.Popen[str]:
    """`_tls_peer.py` inside namespace ``ns``, given ``request``."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    p = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, str(PEER)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert p.stdin is not None
    p.stdin.write(json.dumps(request) + "\n")
    p.stdin.flush()
    return p


def said(p: subprocess.Popen[str]) -> dict[str, object]:
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        _, err = p.communicate(timeout=30)
        raise AssertionError(f"peer exited {p.returncode} without a word:\n{err[-3000:]}")
    out: dict[str, object] = json.loads(line)
    return out


def test_a_guest_moves_between_hosts_only_over_tls_with_the_right_certificates(
    hosts: dict[str, str], pki: dict[str, Path], default_template: Template
) -> None:
    good = peer(hosts["b"], {"role": "dst", "address": f"{B}:0", "tls": str(pki["b"]),
                             "peer": gnutls_dn("pqA")})  # fmt: skip
    rogue = peer(hosts["c"], {"role": "dst", "address": f"{C}:0", "tls": str(pki["c"])})
    procs = [good, rogue]
    try:
        at_b, at_c = said(good), said(rogue)
        assert str(at_b["uri"]).startswith(f"tcp:{B}:") and str(at_b["nbd"]).startswith(f"tcp:{B}:")
        tries = [
            # C's certificate is not from A's CA: refused, the guest runs on at A.
            {"uri": at_c["uri"], "nbd": at_c["nbd"], "tls": str(pki["a"])},
            # B takes TLS only: a clear-text attempt (allowed with insecure) is refused.
            {"uri": at_b["uri"], "nbd": at_b["nbd"], "insecure": True},
            # The real thing: copied disks and RAM, both under TLS, checked both ways.
            {"uri": at_b["uri"], "nbd": at_b["nbd"], "tls": str(pki["a"])},
        ]
        src = peer(hosts["a"], {"role": "src", "template": default_template.name,
                                "templates": str(default_template.directory.parent),
                                "tries": tries})  # fmt: skip
        procs.append(src)
        to_c, plain, to_b = said(src), said(src), said(src)
        assert not to_c["ok"] and to_c["running"], to_c
        assert "certificate hasn't got a known issuer" in str(to_c["error"]), to_c
        assert not plain["ok"] and plain["running"], plain
        assert "TLS" in str(plain["error"]), plain
        assert to_b["ok"], to_b
        out = str(said(good)["out"]).split()
        assert int(out[0]) > 0 and out[1] == "kept"  # the counter ran on; the disk came along
        for p in (src, good):
            assert p.wait(timeout=60) == 0, p.communicate()[1][-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


@pytest.mark.asyncio
async def test_clear_text_migration_off_loopback_is_refused_unless_asked(
    default_template: Template, tmp_path: Path
) -> None:
    vm = await AsyncVM.from_template(default_template)
    try:
        with pytest.raises(MigrationError, match=r"clear text.*tls=MigrationTLS.*insecure=True"):
            await vm.send("tcp:192.0.2.1:4444", storage="shared")
        assert vm.state is VMState.RUNNING
        with pytest.raises(MigrationError, match=r"copying disks to 192\.0\.2\.1"):
            await vm.send("unix:/nonexistent", storage="copied", nbd="tcp:192.0.2.1:10809")
        assert (await vm.run(["true"])).returncode == 0
    finally:
        await vm.stop()
    for wildcard in ("0.0.0.0:0", "[::]:0"):
        dst = AsyncVM(VMSpec(image="default"))
        with pytest.raises(MigrationError, match="clear text"):
            await dst.listen(transport="tcp", address=wildcard)
        assert dst.state is VMState.CREATED and dst.pid is None  # refused before QEMU
    with pytest.raises(MigrationError, match=r"ca-cert\.pem is missing"):
        MigrationTLS(tmp_path)
