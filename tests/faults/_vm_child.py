"""Helper for test_vm_killed: start a paused VM through the sync facade, report, then idle.

``_vm_child.py [share:DIR | net:NAME | tpm:on]...``: the VM shares DIR over virtiofs (a
virtiofsd of pyqvm's own runs beside QEMU), has a NIC on private network NAME (a switch and
its owner process run beside it), or a TPM (a swtpm beside it). Prints one JSON line
``{"pid": ..., "rundir": ...}`` and sleeps until killed (at most 120 s).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pyqvm import VM, Network, Share, VMSpec


def main() -> int:
    args = [a.split(":", 1) for a in sys.argv[1:]]
    shares = tuple(Share(host=Path(v), transport="virtiofs") for k, v in args if k == "share")
    nets = tuple(Network(mode="private", name=v) for k, v in args if k == "net")
    spec = VMSpec(
        name="orphan-check",
        guest_agent=False,
        ready="none",
        extra_args=("-S",),
        shares=shares,
        networks=nets,
        tpm=("tpm", "on") in [tuple(a) for a in args],
    )
    vm = VM(spec)
    vm.start()
    print(json.dumps({"pid": vm.pid, "rundir": str(vm.runtime_dir)}), flush=True)
    time.sleep(120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
