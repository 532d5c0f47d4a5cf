"""Per-VM SSH keys: a client key for ``ssh -i`` and a host key the guest's dropbear reads.

Both are ed25519 and made here, so the host knows the guest's public host key before the
guest boots: ``ssh -o StrictHostKeyChecking=yes`` works on the first connection, with no
trust-on-first-use. Dropbear (2022.83, Debian 12) cannot read OpenSSH-format private keys,
so the host key is also written in dropbear's own format (`dropbear_host_key`).

`cryptography` is imported inside the functions that need it: importing this module costs
nothing for a VM without SSH.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from pyqvm.errors import SpecError

# File names inside the key directory.
CLIENT_KEY = "client_ed25519"
CLIENT_PUB = "client_ed25519.pub"
HOST_KEY_DROPBEAR = "host_ed25519.dropbear"
HOST_PUB = "host_ed25519.pub"

# Key types OpenSSH accepts in authorized_keys (certificates included).
KEY_TYPES = frozenset({
    "ssh-ed25519", "ssh-rsa", "ssh-dss",
    "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-ed25519-cert-v01@openssh.com", "ssh-rsa-cert-v01@openssh.com",
    "ecdsa-sha2-nistp256-cert-v01@openssh.com", "ecdsa-sha2-nistp384-cert-v01@openssh.com",
    "ecdsa-sha2-nistp521-cert-v01@openssh.com",
    "sk-ssh-ed25519-cert-v01@openssh.com", "sk-ecdsa-sha2-nistp256-cert-v01@openssh.com",
})  # fmt: skip

_MAX_PUBLIC_KEY_FILE = 64 * 1024  # an authorized_keys-style file, not a random large file


@dataclass(frozen=True, slots=True)
class SshKeys:
    """The files of one VM's key set (see `make_keys`).

    ``client_key``: OpenSSH private key, mode 0600 (``ssh -i``). ``client_pub``: its
    authorized_keys line. ``host_key_dropbear``: the guest's host key in dropbear's format,
    mode 0600. ``host_pub``: the host key's ``ssh-ed25519 AAAA...`` line (for known_hosts).
    """

    directory: Path
    client_key: Path
    client_pub: Path
    host_key_dropbear: Path
    host_pub: Path

    def host_pub_line(self) -> str:
        """The host key's public line, without its newline."""
        return self.host_pub.read_text().strip()

    def known_hosts_line(self, host: str, port: int) -> str:
        """The known_hosts line for this VM's host key at ``host:port``."""
        return known_hosts_line(host, port, self.host_pub_line())


def _ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def dropbear_host_key(seed: bytes, public: bytes) -> bytes:
    """Dropbear's ed25519 private key file: string("ssh-ed25519") + string(seed || public).

    83 bytes; byte-identical to ``dropbearconvert openssh dropbear``'s output.
    """
    if len(seed) != 32 or len(public) != 32:
        raise ValueError("an ed25519 seed and public key are 32 bytes each")
    return _ssh_string(b"ssh-ed25519") + _ssh_string(seed + public)


def _write(path: Path, data: bytes, mode: int) -> None:
    # Created with its final mode (no window where a private key is world-readable), and
    # fchmod'ed because an existing file keeps its old mode through O_CREAT.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)


def ssh_keys_in(directory: Path) -> SshKeys:
    """The paths of the key set in ``directory`` (made or not)."""
    return SshKeys(
        directory=directory,
        client_key=directory / CLIENT_KEY,
        client_pub=directory / CLIENT_PUB,
        host_key_dropbear=directory / HOST_KEY_DROPBEAR,
        host_pub=directory / HOST_PUB,
    )


def make_keys(directory: Path, *, comment: str = "pyqvm") -> SshKeys:
    """Generate a fresh client key and host key into ``directory`` (made 0700 if absent).

    Existing key files there are replaced.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys = ssh_keys_in(directory)

    client = Ed25519PrivateKey.generate()
    pem = client.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption())
    _write(keys.client_key, pem, 0o600)  # ssh refuses a key others can read
    line = client.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
    _write(keys.client_pub, line + f" {comment}\n".encode(), 0o644)

    host = Ed25519PrivateKey.generate()
    seed = host.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    public = host.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    _write(keys.host_key_dropbear, dropbear_host_key(seed, public), 0o600)
    line = host.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
    _write(keys.host_pub, line + b"\n", 0o644)
    return keys


def known_hosts_line(host: str, port: int, host_pub: str) -> str:
    """``[host]:port TYPE BASE64``, or ``host TYPE BASE64`` for port 22 (OpenSSH's forms).

    ``host_pub`` is a public key line; its comment, if any, is dropped.
    """
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is not a TCP port")
    words = host_pub.split()
    if len(words) < 2 or words[0] not in KEY_TYPES:
        raise ValueError(f"not an SSH public key line: {host_pub[:40]!r}")
    name = host if port == 22 else f"[{host}]:{port}"
    return f"{name} {words[0]} {words[1]}"


def _check_key_line(line: str) -> str | None:
    """Why ``line`` is not ``TYPE BASE64 [COMMENT]``, or None when it is."""
    words = line.split()
    if len(words) < 2:
        return "a line holds no key (expected: TYPE BASE64 [COMMENT])"
    kind, blob = words[0], words[1]
    if kind not in KEY_TYPES:
        return f"unknown key type {kind[:40]!r}"
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        return f"the {kind} key is not valid base64"
    # The blob starts with its own type name as an SSH string: catches a pasted mix-up.
    if len(raw) < 4 or raw[4 : 4 + struct.unpack(">I", raw[:4])[0]] != kind.encode():
        return f"the {kind} key's data does not hold a {kind} key"
    return None


def read_public_key(path: Path | str, *, field: str = "ssh_key") -> str:
    """The SSH public key(s) in the file ``path`` (one ``TYPE BASE64 [COMMENT]`` a line;
    blank and ``#`` lines skipped), ready for an authorized_keys file.

    Raises:
        SpecError: (``field``) the file is unreadable, a private key, or not an SSH public key.
    """
    where = Path(path).expanduser()
    try:
        with where.open("rb") as f:
            data = f.read(_MAX_PUBLIC_KEY_FILE + 1)
    except OSError as e:
        raise SpecError(
            field, f"cannot read the public key file '{where}': {e.strerror or e}; "
            "name an existing file such as ~/.ssh/id_ed25519.pub"
        ) from None  # fmt: skip
    if len(data) > _MAX_PUBLIC_KEY_FILE:
        raise SpecError(field, f"'{where}' is larger than 64 KiB: not an SSH public key file")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise SpecError(field, f"'{where}' is not text: not an SSH public key file") from None
    if "PRIVATE KEY" in text:
        raise SpecError(
            field, f"'{where}' is a private key; name its public half (usually '{where}.pub')"
        )
    lines = [ln.strip() for ln in text.splitlines()]
    keys = [ln for ln in lines if ln and not ln.startswith("#")]
    if not keys:
        raise SpecError(field, f"'{where}' holds no SSH public key; name a .pub file")
    for number, line in enumerate(lines, 1):
        if line in keys and (why := _check_key_line(line)) is not None:
            raise SpecError(
                field, f"'{where}' line {number} is not an SSH public key: {why}; "
                "name a .pub file as written by ssh-keygen"
            )  # fmt: skip
    return "\n".join(keys) + "\n"


__all__ = [
    "SshKeys",
    "dropbear_host_key",
    "known_hosts_line",
    "make_keys",
    "read_public_key",
    "ssh_keys_in",
]
