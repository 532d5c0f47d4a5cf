"""A corpus of malformed spec files (tests/fixtures/bad_specs/*.toml), each refused by
`load_spec` with a `SpecError` naming the field.

Each file says what it must get, in its first lines::

    # expect: <regex searched in str(SpecError), which is "field: message">
    # field: <the SpecError's .field; empty for an error in the file itself (TOML syntax)>
    # xfail: <a known pyqvm bug this file shows; the test is a strict xfail until it is fixed>

Relative paths in a file are taken from the corpus directory (as `load_spec` does), so a file
that names itself (``path = "disk_format_unknown.toml"``) names a file that exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pyqvm.errors import SpecError
from pyqvm.spec.io import load_spec

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "bad_specs"
HEADER = re.compile(rb"# (expect|field|xfail): ?(.*)")


def header(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_bytes().splitlines():
        m = HEADER.fullmatch(line)
        if not m:
            break
        out[m[1].decode()] = m[2].decode()
    return out


def cases() -> list[pytest.ParameterSet]:
    params = []
    for path in sorted(CORPUS.glob("*.toml")):
        h = header(path)
        marks = []
        if "xfail" in h:
            marks.append(pytest.mark.xfail(strict=True, reason=f"BUG: {h['xfail']}"))
        params.append(pytest.param(path, h, id=path.stem, marks=marks))
    return params


def test_the_corpus_is_big_and_every_file_says_what_it_expects() -> None:
    files = sorted(CORPUS.glob("*.toml"))
    assert len(files) >= 40
    for path in files:
        h = header(path)
        assert "expect" in h and "field" in h, f"{path.name}: no '# expect:' / '# field:' lines"
        re.compile(h["expect"])


@pytest.mark.parametrize(("path", "expect"), cases())
def test_bad_spec_is_refused_naming_the_field(path: Path, expect: dict[str, str]) -> None:
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert err.value.field == expect["field"], str(err.value)
    assert re.search(expect["expect"], str(err.value)), str(err.value)
    if err.value.field:
        assert str(err.value).startswith(f"{err.value.field}: ")
    else:  # an error in the file itself names the file
        assert str(err.value).startswith(f"{path}: not valid TOML: ")
