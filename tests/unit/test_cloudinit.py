"""cloud-init seeds: what the spec accepts, and the volume pyqvm writes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pycdlib
import pytest

from pyqvm.errors import SpecError
from pyqvm.launch.seed import seed_files, write_seed
from pyqvm.spec.cloudinit import CloudInit
from pyqvm.spec.io import spec_from_dict


@pytest.mark.parametrize(
    ("kw", "field", "words"),
    [
        ({"user_data": "hostname: x\n"}, "user_data", "must start with #cloud-config"),
        ({"user_data": "#cloud-config\nruncmd: [\n"}, "user_data", "not valid YAML (line"),
        ({"user_data": "#cloud-config\n- a\n- b\n"}, "user_data", "a YAML mapping, not a list"),
        ({"user_data": "#!/bin/sh\n" + "x" * (5 << 20)}, "user_data", "at most 4 MiB"),
        ({"meta_data": "[1, 2]"}, "meta_data", "must be a table"),
        ({"network_config": "ethernets: {}\n"}, "network_config", "version: 1 or version: 2"),
    ],
)
def test_bad_seeds_are_refused_naming_the_field(kw: dict[str, str], field: str, words: str) -> None:
    with pytest.raises(SpecError) as err:
        CloudInit(**kw)
    assert err.value.field == f"cloud_init.{field}"
    assert words in str(err.value)


def test_scripts_and_cloud_configs_are_accepted() -> None:
    CloudInit(user_data="#!/bin/sh\necho hi\n")
    CloudInit(user_data="#cloud-config\n", network_config="network:\n  version: 2\n")


def test_the_busybox_guest_refuses_a_seed() -> None:
    with pytest.raises(SpecError, match="built-in busybox guest has no cloud-init") as err:
        spec_from_dict({"image": "default", "cloud_init": {"user_data": "#cloud-config\n"}})
    assert err.value.field == "cloud_init"


def test_meta_data_from_toml_and_pyqvm_s_keys(tmp_path: Path) -> None:
    spec = spec_from_dict(
        {"image": "debian", "name": "vm_1", "cloud_init": {"meta_data": {"local-hostname": "h"}}}
    )
    assert spec.cloud_init is not None
    files = seed_files(spec.cloud_init, hostname="vm-1", ssh_public_key="ssh-ed25519 AAAA k\n")
    meta = json.loads(files["meta-data"])
    assert meta["local-hostname"] == "h"  # the user's value wins
    assert meta["instance-id"].startswith("pyqvm-vm-1-")
    assert meta["public-keys"] == ["ssh-ed25519 AAAA k"]
    assert files["user-data"] == b"#cloud-config\n"
    again = json.loads(seed_files(spec.cloud_init, hostname="vm-1")["meta-data"])
    assert again["instance-id"] != meta["instance-id"]  # per launch


def test_the_seed_is_an_iso_labelled_cidata_with_cloud_init_names(tmp_path: Path) -> None:
    seed = CloudInit(user_data="#cloud-config\nhostname: a\n", network_config="version: 2\n")
    path = write_seed(tmp_path / "seed.iso", seed_files(seed, hostname="a"))
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        names = {
            iso.full_path_from_dirrecord(r, rockridge=True) for r in iso.list_children(rr_path="/")
        }
        assert {"/user-data", "/meta-data", "/network-config"} <= names
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, rr_path="/user-data")
        assert out.getvalue() == b"#cloud-config\nhostname: a\n"
    finally:
        iso.close()
