"""A virtual TPM and Secure Boot in argv, and what refuses them (issue 25)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from pyqvm import preview_argv
from pyqvm.errors import HostError, SpecError
from pyqvm.launch.swtpm import Swtpm, swtpm_argv
from pyqvm.spec import VMSpec

BARE = {"guest_agent": False, "ready": "none"}


def test_secure_boot_takes_the_enrolled_store_with_smm_and_a_tpm_its_swtpm() -> None:
    spec = VMSpec(firmware="ovmf", secure_boot=True, tpm=True, **BARE)  # type: ignore[arg-type]
    argv = preview_argv(spec)
    machine = argv[argv.index("-machine") + 1]
    assert "smm=on" in machine and "pflash1=pq-ovmf-vars" in machine
    assert "driver=cfi.pflash01,property=secure,value=on" in argv
    blockdevs = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]
    code, store = blockdevs[0], blockdevs[1]
    assert code["read-only"] is True and "secboot" in Path(code["filename"]).resolve().name
    assert store["filename"] == "$PYQVM_RUNDIR/efivars.fd" and "read-only" not in store
    assert argv[argv.index("-tpmdev") + 1] == "emulator,id=pq-tpm,chardev=pq-tpm-chr"
    assert "socket,id=pq-tpm-chr,path=$PYQVM_RUNDIR/swtpm.sock" in argv
    devices = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-device"]
    assert {"driver": "tpm-crb", "id": "pq-tpm-dev", "tpmdev": "pq-tpm"} in devices


def test_secure_boot_without_enrolled_keys_takes_the_empty_store() -> None:
    spec = VMSpec(firmware="ovmf", secure_boot=True, enrolled_keys=False, **BARE)  # type: ignore[arg-type]
    assert spec.enrolled_keys is False
    argv = preview_argv(spec)
    code = json.loads(argv[argv.index("-blockdev") + 1])
    assert code["filename"].endswith("OVMF_CODE_4M.secboot.fd")
    assert "smm=on" in argv[argv.index("-machine") + 1]


def test_plain_uefi_keeps_no_variable_store_and_no_smm() -> None:
    argv = preview_argv(VMSpec(firmware="ovmf", **BARE))  # type: ignore[arg-type]
    machine = argv[argv.index("-machine") + 1]
    assert "smm" not in machine and "pflash1" not in machine and "-tpmdev" not in argv


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"secure_boot": True}, "secure_boot"),  # SeaBIOS
        ({"secure_boot": True, "firmware": "ovmf", "machine": "pc"}, "secure_boot"),
        ({"tpm": True, "image": "default", "machine": "microvm"}, "tpm"),
        ({"tpm": "yes"}, "tpm"),
    ],
)
def test_what_cannot_have_secure_boot_or_a_tpm_is_refused(
    kw: dict[str, object], field: str
) -> None:
    with pytest.raises(SpecError) as e:
        VMSpec(**kw)  # type: ignore[arg-type]
    assert e.value.field == field


def test_a_missing_swtpm_is_named_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no swtpm on it
    monkeypatch.delenv("PYQVM_SWTPM", raising=False)
    spec = VMSpec(tpm=True, **BARE)  # type: ignore[arg-type]
    with pytest.raises(HostError, match=r"install it .*swtpm"):
        asyncio.run(Swtpm().spawn(spec, tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_swtpm_serves_tpm2_on_the_runtime_dirs_socket_and_ends_with_qemu() -> None:
    argv = swtpm_argv(Path("/usr/bin/swtpm"), Path("/run/x"))
    assert argv[:3] == ["/usr/bin/swtpm", "socket", "--tpm2"]
    assert "dir=/run/x/tpm" in argv and "type=unixio,path=/run/x/swtpm.sock" in argv
    assert "--terminate" in argv
