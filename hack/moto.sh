#!/usr/bin/env bash
# Creates (or reuses) the environment of the S3-compatible server the tests run against: moto in server mode
# (moto_server), with boto3 for setting up users and buckets. It cannot share the project's venv (see
# moto-constraints.txt), so it lives beside it: $KUBETUNE_CACHE/moto/<hash of the pins + python version>.
# Seconds when cached. Prints the environment's directory on its last line.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
python=${PYTHON:-python3}
pins=$root/hack/moto-constraints.txt
key=$({ cat "$pins"; "$python" --version; } | sha256sum | cut -c1-16)
env=$cache/moto/$key

if [ ! -f "$env/.complete" ]; then
  printf '[moto] creating %s\n' "$env" >&2
  rm -rf "$env"
  "$python" -m venv "$env"
  "$env/bin/pip" install --quiet --progress-bar off -c "$pins" "moto[s3]" flask flask-cors >&2
  touch "$env/.complete"
fi
echo "$env"
