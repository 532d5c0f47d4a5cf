"""pyqvm.host.sshkeys: key files, dropbear's host key format, known_hosts lines, user keys."""

from __future__ import annotations

import base64
import stat
import struct
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from pyqvm.errors import SpecError
from pyqvm.host.sshkeys import dropbear_host_key, known_hosts_line, make_keys, read_public_key


def ssh_strings(data: bytes) -> list[bytes]:
    """Split SSH wire strings (uint32 big-endian length + bytes); the data must end exactly."""
    out: list[bytes] = []
    while data:
        (n,) = struct.unpack(">I", data[:4])
        assert len(data) >= 4 + n
        out.append(data[4 : 4 + n])
        data = data[4 + n :]
    return out


def test_dropbear_host_key_parses_back_and_matches_host_pub(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    blob = keys.host_key_dropbear.read_bytes()
    assert len(blob) == 83
    kind, secret = ssh_strings(blob)
    assert kind == b"ssh-ed25519" and len(secret) == 64
    seed, public = secret[:32], secret[32:]
    # The seed really is the private half of the public key that follows it ...
    derived = ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key()
    raw = serialization.Encoding.Raw
    assert derived.public_bytes(raw, serialization.PublicFormat.Raw) == public
    # ... and that public key is the one host_pub announces.
    words = keys.host_pub_line().split()
    assert words[0] == "ssh-ed25519"
    assert ssh_strings(base64.b64decode(words[1])) == [b"ssh-ed25519", public]


def test_client_key_loads_and_matches_client_pub(tmp_path: Path) -> None:
    keys = make_keys(tmp_path)
    private = serialization.load_ssh_private_key(keys.client_key.read_bytes(), password=None)
    mine = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    line = keys.client_pub.read_text()
    assert line.endswith(" pyqvm\n")
    assert line.split()[:2] == mine.decode().split()
    assert read_public_key(keys.client_pub) == line


def test_modes_and_fresh_keys_each_time(tmp_path: Path) -> None:
    d = tmp_path / "k"
    keys = make_keys(d)
    first_host_pub = keys.host_pub_line()

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(d) == 0o700
    assert mode(keys.client_key) == mode(keys.host_key_dropbear) == 0o600
    assert mode(keys.client_pub) == mode(keys.host_pub) == 0o644
    keys.client_key.chmod(0o644)  # a replaced file gets its mode back, not the old one
    again = make_keys(d)
    assert mode(again.client_key) == 0o600
    assert again.host_pub_line() != first_host_pub  # a new host key


def test_dropbear_host_key_rejects_wrong_sizes() -> None:
    with pytest.raises(ValueError):
        dropbear_host_key(b"x" * 31, b"y" * 32)


def test_known_hosts_line_forms() -> None:
    pub = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAcN+zXcoJazfNNb6hD3rbVv/qYHWKfL24X0lgnzXzXg root@vm"
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAcN+zXcoJazfNNb6hD3rbVv/qYHWKfL24X0lgnzXzXg"
    assert known_hosts_line("127.0.0.1", 2222, pub) == f"[127.0.0.1]:2222 {key}"
    assert known_hosts_line("127.0.0.1", 22, pub + "\n") == f"127.0.0.1 {key}"
    with pytest.raises(ValueError):
        known_hosts_line("127.0.0.1", 0, pub)
    with pytest.raises(ValueError):
        known_hosts_line("127.0.0.1", 22, "hello")


def test_known_hosts_line_of_a_key_set(tmp_path: Path) -> None:
    keys = make_keys(tmp_path)
    line = keys.known_hosts_line("127.0.0.1", 40022)
    assert line == "[127.0.0.1]:40022 " + keys.host_pub_line()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "holds no SSH public key"),
        (b"# just a comment\n\n", "holds no SSH public key"),
        (b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3Bl\n", "is a private key"),
        (b"hello world\n", "line 1 is not an SSH public key: unknown key type"),
        (b"ssh-ed25519\n", "no key"),
        (b"ssh-ed25519 !!!notbase64\n", "not valid base64"),
        (b"ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIAcN+zXcoJazfNNb6hD3rbVv/qYHWKfL24X0lgnzXzXg\n",
         "does not hold a ssh-rsa key"),
        (b"\xff\xfe binary", "is not text"),
    ],
)  # fmt: skip
def test_read_public_key_refusals_name_the_field(
    tmp_path: Path, content: bytes, match: str
) -> None:
    path = tmp_path / "id.pub"
    path.write_bytes(content)
    with pytest.raises(SpecError, match=match) as info:
        read_public_key(path, field="ssh.authorized_key")
    assert info.value.field == "ssh.authorized_key"
    assert str(info.value).startswith("ssh.authorized_key: ")


def test_read_public_key_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"cannot read .*name an existing file") as info:
        read_public_key(tmp_path / "nope.pub")
    assert info.value.field == "ssh_key"


def test_read_public_key_keeps_every_key_and_skips_comments(tmp_path: Path) -> None:
    a, b = make_keys(tmp_path / "a"), make_keys(tmp_path / "b")
    path = tmp_path / "keys"
    path.write_text(f"# mine\n{a.client_pub.read_text()}\n  {b.host_pub.read_text()}")
    assert read_public_key(path) == a.client_pub.read_text() + b.host_pub.read_text()


def test_dropbearkey_reads_our_host_key(tmp_path: Path) -> None:
    keys = make_keys(tmp_path)
    out = subprocess.run(
        ["dropbearkey", "-y", "-f", str(keys.host_key_dropbear)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    public = next(ln for ln in out.stdout.splitlines() if ln.startswith("ssh-ed25519 "))
    assert public.split()[:2] == keys.host_pub_line().split()
