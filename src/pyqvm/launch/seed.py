"""The NoCloud seed volume of one launch: an ISO 9660 file system labelled ``cidata``.

Written with pycdlib (a well-kept pure-Python ISO 9660 writer: no genisoimage or
xorriso on the host, and nothing to parse from a tool's output), with Joliet
and Rock Ridge names so the guest sees ``user-data``, ``meta-data`` and
``network-config`` as cloud-init expects (as ``cloud-localds`` makes them).
pyqvm attaches it as a read-only disk: NoCloud looks for the label on any
block device.
"""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import pycdlib

from pyqvm.spec.cloudinit import CloudInit

SEED_FILE = "seed.iso"
LABEL = "cidata"
_NAMES = {"user-data": "USERDATA.;1", "meta-data": "METADATA.;1", "network-config": "NETCFG.;1"}


def seed_files(
    seed: CloudInit, *, hostname: str, ssh_public_key: str | None = None
) -> dict[str, bytes]:
    """The seed's files: the user's, with pyqvm's meta-data merged under theirs."""
    meta: dict[str, object] = {
        # Per launch: cloud-init runs its per-instance modules again for a new id.
        "instance-id": f"pyqvm-{hostname}-{uuid.uuid4().hex[:12]}",
        "local-hostname": hostname,
    }
    if ssh_public_key:
        meta["public-keys"] = [ssh_public_key.strip()]
    meta |= seed.meta()
    files = {
        "meta-data": json.dumps(meta, indent=1).encode() + b"\n",
        # NoCloud wants user-data present; an empty cloud-config changes nothing.
        "user-data": (seed.user_data or "#cloud-config\n").encode(),
    }
    if seed.network_config is not None:
        files["network-config"] = seed.network_config.encode()
    return files


def write_seed(path: Path, files: dict[str, bytes]) -> Path:
    """Write the ISO 9660 volume ``cidata`` holding ``files`` to ``path``."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=LABEL)
    try:
        for name, data in files.items():
            iso.add_fp(
                io.BytesIO(data),
                len(data),
                f"/{_NAMES[name]}",
                rr_name=name,
                joliet_path=f"/{name}",
            )
        iso.write(str(path))
    finally:
        iso.close()
    return path


__all__ = ["LABEL", "SEED_FILE", "seed_files", "write_seed"]
