"""The launchers find the project's interpreter without an activated venv (``launchers/_python.sh``).

Only the discovery runs here (a bash one-liner, no training): multi-process
launches are tests/pretrain/test_distributed.py's.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DISCOVERY = REPO_ROOT / "launchers" / "_python.sh"
VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
# A shell as a fresh login has it: no venv on PATH, none activated, no override.
BARE_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}


def _discover(env: dict[str, str], *, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/bash", str(DISCOVERY), "--print"], cwd=cwd, env=env, capture_output=True, text=True, timeout=30
    )


@pytest.mark.skipif(not VENV_PYTHON.exists(), reason="no .venv in this checkout")
def test_without_an_activated_venv_the_projects_venv_is_found(tmp_path: Path) -> None:
    """From any working directory: the repo is this script's directory/.., not the caller's."""
    proc = _discover(BARE_ENV, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(VENV_PYTHON)


def test_an_activated_venv_and_the_override_come_first(tmp_path: Path) -> None:
    venv = tmp_path / "other-venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to("/bin/sh")
    assert _discover({**BARE_ENV, "VIRTUAL_ENV": str(venv)}).stdout.strip() == str(venv / "bin" / "python")
    override = {**BARE_ENV, "VIRTUAL_ENV": str(venv), "PYTHON": "/bin/sh"}
    assert _discover(override).stdout.strip() == "/bin/sh"


@pytest.mark.parametrize("bad", [{"PYTHON": "/nonexistent/python"}, {"VIRTUAL_ENV": "/nonexistent"}])
def test_a_broken_explicit_choice_is_an_error_not_a_fallback(bad: dict[str, str]) -> None:
    proc = _discover({**BARE_ENV, **bad})
    assert proc.returncode == 2 and proc.stdout == ""
    assert next(iter(bad.values())) in proc.stderr


def test_sourcing_sets_py_and_ignores_the_launchers_arguments() -> None:
    """Sourced from a launcher, the file sees the launcher's "$@"; a --print there must not exit the launcher."""
    script = f'set -euo pipefail; source "{DISCOVERY}"; echo "PY=$PY"'
    proc = subprocess.run(
        ["/bin/bash", "-c", script, "launcher", "--print"],
        env={**BARE_ENV, "PYTHON": "/bin/sh"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "PY=/bin/sh"
