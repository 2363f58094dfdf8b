#!/usr/bin/env bash
# Installs the Debian packages listed in hack/system-packages.txt that are missing (a file that is neither on
# PATH nor at its absolute path). Silent and instant when nothing is missing. Needs root or sudo and apt.
# Services that come with a package (a system Prometheus, ...) are not started: the tests start their own.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

missing=()
while read -r file package _; do
  case $file in '' | '#'*) continue ;; esac
  if [[ $file == /* ]]; then [ -e "$file" ] && continue; else command -v "$file" >/dev/null && continue; fi
  [[ " ${missing[*]} " == *" $package "* ]] || missing+=("$package")
done <"$here/system-packages.txt"
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null; then
  echo "missing Debian packages: ${missing[*]} (no apt-get here: install them by hand)" >&2
  exit 1
fi
sudo=()
[ "$(id -u)" = 0 ] || sudo=(sudo)
echo "[system-packages] installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# No service may start from a package's install script (policy-rc.d: 101 = action forbidden).
guard=/usr/sbin/policy-rc.d
if [ ! -e "$guard" ]; then
  printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$guard" >/dev/null
  "${sudo[@]}" chmod 755 "$guard"
  trap '"${sudo[@]}" rm -f "$guard"' EXIT
fi
apt_install() { "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; }
apt_install || { "${sudo[@]}" apt-get update -q >&2 && apt_install; }
