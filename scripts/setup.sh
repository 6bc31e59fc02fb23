#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12 and installs Loom into it (editable).
#   scripts/setup.sh          library + programs
#   scripts/setup.sh test     also the test extras (pytest, torch, transformers, peft, openai, llama-cpp-python,
#                             built from source once: about 6 minutes on 2 cores; optuna)
# Re-running is cheap: nothing is reinstalled unless setup.py changed.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-}"
case "$extras" in
  ""|test) ;;
  *) echo "scripts/setup.sh: unknown argument '$extras' (valid: none, 'test')" >&2; exit 2 ;;
esac

is_ok_python() {  # runs it: pyenv shims exist on PATH but fail when their version is not selected
  "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
  local c
  for c in python3.12 python3.13 python3.14 python3 python; do
    if command -v "$c" >/dev/null 2>&1 && is_ok_python "$c"; then command -v "$c"; return 0; fi
  done
  local root="${PYENV_ROOT:-$HOME/.pyenv}"
  for c in "$root"/versions/3.12*/bin/python3 "$root"/versions/3.1[3-9]*/bin/python3; do
    if [ -x "$c" ] && is_ok_python "$c"; then echo "$c"; return 0; fi
  done
  return 1
}

if [ ! -x .venv/bin/python ] || ! is_ok_python .venv/bin/python; then
  if ! py="$(find_python)"; then
    echo "scripts/setup.sh: no Python >= 3.12 found (looked on PATH for python3.12/3.13/3.14/python3/python" >&2
    echo "and in ${PYENV_ROOT:-$HOME/.pyenv}/versions). Install Python 3.12+ and re-run." >&2
    exit 1
  fi
  echo "scripts/setup.sh: creating .venv with $py ($("$py" -V 2>&1))"
  rm -rf .venv
  "$py" -m venv .venv
fi

stamp=".venv/.loom-installed${extras:+-$extras}"
want="$(sha256sum setup.py | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  spec="."
  [ "$extras" = "test" ] && spec=".[test]"
  echo "scripts/setup.sh: installing $spec into .venv (first time: several minutes; torch for tests is large)"
  .venv/bin/python -m pip install --disable-pip-version-check -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install --disable-pip-version-check -q -e "$spec"
  echo "$want" > "$stamp"
fi
