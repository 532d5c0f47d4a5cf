"""host/claims.py: one device, one VM, across processes; stale claims of dead processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import pyqvm
from pyqvm.errors import DeviceClaimedError, HostError
from pyqvm.host.claims import ClaimRecord, ClaimStore, default_claims_dir, process_start_time

VF = "0000:03:10.0"
SRC = str(Path(pyqvm.__file__).resolve().parents[1])

# Claims when the go-file appears, reports, then holds the claim until stdin closes.
CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from pyqvm.errors import DeviceClaimedError
    from pyqvm.host.claims import ClaimStore

    store, address, vm = ClaimStore(Path(sys.argv[1])), sys.argv[2], sys.argv[3]
    go = Path(sys.argv[4])
    while not go.exists():
        time.sleep(0.005)
    try:
        store.claim(address, vm, original_driver="igbvf")
    except DeviceClaimedError as e:
        lost = {"won": False, "holder": e.holder, "pid": e.pid, "msg": str(e)}
        print(json.dumps(lost), flush=True)
    else:
        print(json.dumps({"won": True}), flush=True)
    sys.stdin.read()
    """
)


def _child(store: ClaimStore, vm: str, go: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(store.directory), VF, vm, str(go)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.fixture
def store(tmp_path: Path) -> ClaimStore:
    return ClaimStore(tmp_path / "claims")


def test_two_processes_claim_one_vf_one_wins(store: ClaimStore, tmp_path: Path) -> None:
    go = tmp_path / "go"
    children = {vm: _child(store, vm, go) for vm in ("vm-a", "vm-b")}
    try:
        go.touch()  # both race for the same VF now
        results = {}
        for vm, child in children.items():
            assert child.stdout is not None
            results[vm] = json.loads(child.stdout.readline())
        winners = [vm for vm, r in results.items() if r["won"]]
        assert len(winners) == 1, results
        (winner,) = winners
        (loser,) = set(results) - {winner}
        lost = results[loser]
        assert lost["holder"] == winner
        assert lost["pid"] == children[winner].pid
        assert f"in use by VM {winner!r}" in lost["msg"]
        # This process is turned away too, with the holder's name.
        with pytest.raises(DeviceClaimedError) as info:
            store.claim(VF, "vm-c")
        assert (info.value.holder, info.value.pid) == (winner, children[winner].pid)
        assert store.holders() == {VF: winner}
    finally:
        for child in children.values():
            child.communicate("", timeout=10)


def test_stale_claim_of_a_killed_process_is_reclaimed(store: ClaimStore, tmp_path: Path) -> None:
    go = tmp_path / "go"
    go.touch()
    child = _child(store, "vm-dead", go)
    assert child.stdout is not None
    assert json.loads(child.stdout.readline()) == {"won": True}
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    assert child.stdin is not None
    child.stdin.close()
    child.stdout.close()

    (rec,) = store.records()
    assert (rec.vm, rec.pid, rec.alive, rec.original_driver) == (
        "vm-dead",
        child.pid,
        False,
        "igbvf",
    )
    assert store.holder(VF) is None
    assert store.stale() == [rec]
    claim = store.claim(VF, "vm-new")
    assert claim.stale == rec  # the dead owner's record, for restoring the device
    assert store.holders() == {VF: "vm-new"}


def test_reused_pid_with_another_start_time_is_stale(store: ClaimStore) -> None:
    store.directory.mkdir(parents=True)
    fake = ClaimRecord(address=VF, vm="old", pid=os.getpid(), start_time="1", token="x")
    (store.directory / f"{VF}.json").write_text(json.dumps(fake.to_json()))
    assert not store.records()[0].alive
    assert store.claim(VF, "new").stale == fake


def test_same_process_second_vm_is_refused_and_release_frees(store: ClaimStore) -> None:
    claim = store.claim(VF, "vm-a")
    assert claim.record.alive and claim.record.start_time == process_start_time(os.getpid())
    with pytest.raises(DeviceClaimedError, match=r"0000:03:10.0 is in use by VM 'vm-a'"):
        store.claim(VF, "vm-b")
    claim.update(original_driver="igbvf", bound=True)
    assert store.records()[0].original_driver == "igbvf"
    claim.release()
    claim.release()  # idempotent
    assert store.records() == []
    assert store.claim(VF, "vm-b").stale is None


def test_release_does_not_drop_a_successors_claim(store: ClaimStore) -> None:
    first = store.claim(VF, "vm-a")
    (store.directory / f"{VF}.json").unlink()  # e.g. someone cleaned the directory
    second = store.claim(VF, "vm-b")
    first.release()
    assert store.holder(VF) == second.record
    with pytest.raises(HostError, match="vanished"):
        first.update(bound=True)


def test_default_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PYQVM_CLAIMS_DIR", str(tmp_path / "x"))
    assert default_claims_dir() == tmp_path / "x"
    monkeypatch.delenv("PYQVM_CLAIMS_DIR")
    expected = Path("/run/pyqvm/claims") if os.geteuid() == 0 else None
    if expected is not None:
        assert default_claims_dir() == expected
    else:
        assert default_claims_dir().name == "claims"


def test_unwritable_dir_says_what_to_do(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(
        HostError, match=r"cannot create the device claims directory.*PYQVM_CLAIMS_DIR"
    ):
        ClaimStore(blocker / "claims").claim(VF, "vm")
