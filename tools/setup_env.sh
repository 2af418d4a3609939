# Sourced by run_default.sh and run_tests.sh: creates .venv (once) and installs graphq into it.
# torch is installed first with its exact pin so that the CPU build (a local file on our machines)
# is used; an unpinned torch would pull several GB of CUDA packages.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${GRAPHQ_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
STAMP="$VENV/.graphq-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  python -m pip install --quiet --disable-pip-version-check --upgrade pip
  python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
  python -m pip install --quiet --disable-pip-version-check -e "$ROOT[test]"
  touch "$STAMP"
fi
cd "$ROOT"
