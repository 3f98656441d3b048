# Shared by the launchers: the Python interpreter that has the project's dependencies, so a
# launcher works without an activated venv (a bare `python`/`torchrun` on PATH may be a system
# Python without torch, or missing). Sourced, it sets PY; run as `bash launchers/_python.sh --print`
# it prints what a launcher would use.
#
# First match wins:
#   1. $PYTHON                  an explicit override (a path, or a name on PATH)
#   2. $VIRTUAL_ENV/bin/python  the venv the user activated
#   3. <repo>/.venv/bin/python  the project's venv (repo = this file's directory/..)
#   4. python3 from PATH
# The venv's python is used by its path, never a resolved symlink: that path is what makes it the venv.

project_python() {
    local repo_root
    repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    if [[ -n "${PYTHON:-}" ]]; then
        command -v "$PYTHON" || { echo "PYTHON=$PYTHON is not an executable" >&2; return 2; }
    elif [[ -n "${VIRTUAL_ENV:-}" ]]; then
        # An activated venv is the user's explicit choice: a broken one is an error, not a fallback.
        [[ -x "$VIRTUAL_ENV/bin/python" ]] || { echo "VIRTUAL_ENV=$VIRTUAL_ENV has no bin/python" >&2; return 2; }
        echo "$VIRTUAL_ENV/bin/python"
    elif [[ -x "$repo_root/.venv/bin/python" ]]; then
        echo "$repo_root/.venv/bin/python"
    else
        command -v python3 || { echo "no Python found: set PYTHON=/path/to/python or create $repo_root/.venv" >&2; return 2; }
    fi
}

# Only when run, not sourced: a sourced file sees the launcher's own arguments in "$@".
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    if [[ "${1:-}" == "--print" ]]; then
        project_python
        exit
    fi
    echo "usage: bash ${BASH_SOURCE[0]} --print   (the launchers source this file)" >&2
    exit 2
fi
PY=$(project_python)
