#!/bin/bash
# Offline install of the release's dependencies: a virtualenv next to this script, from
# wheelhouse/ only (no index, hashes required), for the given Python (default
# /usr/bin/python3). Built in a temporary directory and renamed into place, so two hosts
# sharing the release directory (EFS) never see a half-made one.
set -euo pipefail
HERE=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)
PY=${1:-/usr/bin/python3}
VER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
VENV="$HERE/venv-$VER"
# Up to date when it was made from this wheelhouse (a git checkout of a newer release
# keeps the untracked venv of the previous one: that one is replaced).
STAMP=.wheelhouse-requirements.txt
if [[ -x $VENV/bin/python ]] && cmp -s "$VENV/$STAMP" "$HERE/wheelhouse/requirements.txt"; then
    exit 0
fi
TMP=$(mktemp -d "$HERE/.venv-$VER.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
chmod 0755 "$TMP"  # mktemp's 0700 would hide the venv from the units' user (portal) when root installs
# --without-pip, and pip run from its wheel in the wheelhouse: no ensurepip needed
# (Debian and Ubuntu ship it in python3-venv, which minimal hosts do not have).
"$PY" -m venv --without-pip "$TMP" || { echo "install.sh: $PY -m venv --without-pip failed" >&2; exit 1; }
PIP_WHEEL=$(find "$HERE/wheelhouse" -maxdepth 1 -name 'pip-*-py3-none-any.whl' | sort | tail -n 1)
[[ -n $PIP_WHEEL ]] || { echo "install.sh: no pip wheel in $HERE/wheelhouse" >&2; exit 1; }
"$TMP/bin/python" "$PIP_WHEEL/pip" install --quiet --disable-pip-version-check --no-index \
    --find-links "$HERE/wheelhouse" --require-hashes --only-binary=:all: -r "$HERE/wheelhouse/requirements.txt"
cp "$HERE/wheelhouse/requirements.txt" "$TMP/$STAMP"
# The venv's interpreter finds its pyvenv.cfg next to bin/, so the directory can move;
# only console-script shebangs would not (bin/hpc-portal-service uses python -m).
if [[ -e $VENV ]] && ! cmp -s "$VENV/$STAMP" "$HERE/wheelhouse/requirements.txt"; then
    rm -rf "$VENV"  # a previous release's: the units are stopped or restart on the new one
fi
mv -T "$TMP" "$VENV" 2>/dev/null || [[ -x $VENV/bin/python ]]
trap - EXIT
rm -rf "$TMP"
echo "install.sh: $VENV ready" >&2
