"""The CI jobs docs/ci.md offers parse as YAML, and every pyqvm command in them is one the
CLI accepts (a renamed verb or option fails here, not in a user's pipeline)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from pyqvm.cli import parse_args

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "ci"
_SEPARATORS = re.compile(r"\s*(?:&&|\|\||;|\n)\s*")
_SHELL_WORDS = ("if", "then", "else", "elif", "fi", "do", "done")


def scripts(path: Path) -> list[str]:
    """The shell scripts of a GitHub Actions workflow's steps or a GitLab job."""
    doc = yaml.safe_load(path.read_text())
    found: list[str] = []
    if "jobs" in doc:  # GitHub Actions
        for job in doc["jobs"].values():
            found += [step["run"] for step in job["steps"] if "run" in step]
    else:  # GitLab CI
        for job in doc.values():
            if isinstance(job, dict):
                for key in ("before_script", "script", "after_script"):
                    found += job.get(key, [])
    return found


def pyqvm_commands(script: str) -> list[list[str]]:
    commands = []
    for part in _SEPARATORS.split(script.replace("\\\n", " ")):
        words = shlex.split(part) if part.strip() else []
        while words and words[0] in _SHELL_WORDS:
            words.pop(0)
        if words and words[0] == "pyqvm":
            commands.append(words[1:])
    return commands


@pytest.mark.parametrize("name", ["github-actions.yml", "gitlab-ci.yml"])
def test_every_pyqvm_command_of_a_ci_example_exists(name: str) -> None:
    commands = [c for s in scripts(EXAMPLES / name) for c in pyqvm_commands(s)]
    verbs = {" ".join(c[:2]) if c[0] == "image" else c[0] for c in commands}
    # the job builds, exports, imports the image and checks the host
    assert {"image build", "image export", "image import", "doctor"} <= verbs, verbs
    for argv in commands:
        try:
            parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"{name}: `pyqvm {shlex.join(argv)}` is refused by the CLI ({e})")


def test_a_wrong_command_would_be_caught() -> None:
    assert pyqvm_commands('if [ -f x ]; then pyqvm image impor "$F"; fi') == [
        ["image", "impor", "$F"]
    ]
    with pytest.raises(SystemExit):
        parse_args(["image", "impor", "x"])
