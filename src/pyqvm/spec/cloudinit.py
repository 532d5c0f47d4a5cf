"""A cloud-init NoCloud seed in the spec (`CloudInit`): what a cloud image is told at boot.

Checked when the spec is built, before QEMU starts: user-data must be a
``#cloud-config`` document that parses as a YAML mapping, a script (``#!``)
or a MIME multipart (``Content-Type:``); meta-data a mapping; network-config
a YAML mapping with ``version: 1`` or ``2``. The seed volume itself is
written at launch by `pyqvm.launch.seed`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from pyqvm.errors import SpecError
from pyqvm.spec.fields import set_field

#: pyqvm's own bound on each seed file. NoCloud reads whole files (there is no limit of
#: its own to respect); this only stops a path or a binary pasted by mistake.
MAX_SEED_FILE = 4 << 20
USER_DATA_HEADERS = ("#cloud-config", "#!", "Content-Type:", "#include", "#cloud-boothook")


def _yaml(text: str, field: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(field, f"not valid YAML{where}: {problem}") from None


def _bounded(text: object, field: str) -> str:
    if not isinstance(text, str):
        raise SpecError(field, f"expected text, got {type(text).__name__}")
    if len(text.encode()) > MAX_SEED_FILE:
        raise SpecError(field, f"{len(text.encode())} bytes; a seed file is at most 4 MiB")
    return text


@dataclass(frozen=True, slots=True)
class CloudInit:
    """A NoCloud seed: ``user_data`` (text), ``meta_data`` (a table, or YAML/JSON text)
    and ``network_config`` (YAML text, v1 or v2). pyqvm adds a per-launch
    ``instance-id``, the VM's name as ``local-hostname`` (unless meta_data sets
    them), and the VM's SSH public key when it has one (see docs/guests.md)."""

    user_data: str | None = None
    meta_data: str | Mapping[str, Any] | None = None
    network_config: str | None = None

    def __post_init__(self) -> None:
        if self.user_data is not None:
            text = _bounded(self.user_data, "cloud_init.user_data")
            if not text.startswith(USER_DATA_HEADERS):
                raise SpecError(
                    "cloud_init.user_data",
                    "must start with #cloud-config (YAML), #! (a script) or Content-Type: "
                    f"(MIME multipart); it starts with {text[:20]!r}",
                )
            if text.startswith("#cloud-config"):
                doc = _yaml(text, "cloud_init.user_data")
                if doc is not None and not isinstance(doc, dict):
                    raise SpecError(
                        "cloud_init.user_data",
                        f"a #cloud-config document is a YAML mapping, not a {type(doc).__name__}",
                    )
        meta = self.meta_data
        if meta is not None:
            if isinstance(meta, Mapping):
                try:
                    meta = json.dumps(dict(meta), sort_keys=True)
                except (TypeError, ValueError) as e:
                    raise SpecError("cloud_init.meta_data", f"not plain data: {e}") from None
            doc = _yaml(_bounded(meta, "cloud_init.meta_data"), "cloud_init.meta_data")
            if not isinstance(doc, dict):
                raise SpecError("cloud_init.meta_data", "must be a table (a YAML mapping)")
            set_field(self, "meta_data", meta)
        if self.network_config is not None:
            doc = _yaml(
                _bounded(self.network_config, "cloud_init.network_config"),
                "cloud_init.network_config",
            )
            inner = doc.get("network", doc) if isinstance(doc, dict) else None
            if not isinstance(inner, dict) or inner.get("version") not in (1, 2):
                raise SpecError(
                    "cloud_init.network_config",
                    "must be a YAML mapping with version: 1 or version: 2 (cloud-init's "
                    "network config formats)",
                )

    def meta(self) -> dict[str, Any]:
        """meta_data as a mapping (empty when not given)."""
        if self.meta_data is None:
            return {}
        assert isinstance(self.meta_data, str)
        doc: dict[str, Any] = yaml.safe_load(self.meta_data)
        return doc


__all__ = ["MAX_SEED_FILE", "CloudInit"]
