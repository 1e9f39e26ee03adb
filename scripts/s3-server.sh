#!/usr/bin/env bash
# The S3-compatible server the object-store conformance tests run against: moto's server mode
# (PyPI `moto[server]`, in memory), installed into a venv under a cache when missing.
#
# Usage:
#   scripts/s3-server.sh install   install when missing; print the moto_server path (last line)
#   scripts/s3-server.sh path      print the moto_server path, or fail if it is not installed
#   scripts/s3-server.sh install-s3s-fs
#                                  install s3s-fs (crates.io, files on disk) when missing; print its
#                                  path (last line). Only the offload benchmark uses it.
#
# Cache: $MAGNETAR_S3_SERVER_CACHE, default ~/.cache/magnetar/s3-server (venv in venv/). The
# tests (bookie/tests/offload_conformance.rs) look for $MAGNETAR_MOTO_SERVER first, then
# <cache>/venv/bin/moto_server, then moto_server on PATH, and fail with a clear message when none
# exists: they never skip. Each test starts its own server on an ephemeral 127.0.0.1 port.
set -euo pipefail

MOTO_VERSION=5.2.5
S3S_FS_VERSION=0.14.1
CACHE="${MAGNETAR_S3_SERVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/magnetar/s3-server}"
VENV="$CACHE/venv"
MOTO_SERVER="$VENV/bin/moto_server"

installed() {
  [ -x "$MOTO_SERVER" ] &&
    [ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("moto"))' 2>/dev/null || true)" = "$MOTO_VERSION" ]
}

case "${1:-install}" in
  path)
    installed || { echo "s3-server: moto $MOTO_VERSION is not installed in $VENV: run scripts/s3-server.sh install" >&2; exit 1; }
    echo "$MOTO_SERVER"
    ;;
  install)
    if ! installed; then
      # Same approach as scripts/helm-check.sh: python3-venv from Debian when missing.
      if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        echo "installing python3-venv (Debian)" >&2
        SUDO=""
        [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null
      fi
      mkdir -p "$CACHE"
      if ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        rm -rf "$VENV"
        python3 -m venv "$VENV"
      fi
      echo "installing moto[server]==$MOTO_VERSION (PyPI) into $VENV" >&2
      PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" install -q "moto[server]==$MOTO_VERSION" >&2
      installed || { echo "s3-server: moto_server missing after install in $VENV" >&2; exit 1; }
    fi
    echo "$MOTO_SERVER"
    ;;
  install-s3s-fs)
    S3S_FS="$CACHE/s3s-fs/bin/s3s-fs"
    if ! [ -x "$S3S_FS" ] || [ "$("$S3S_FS" --version 2>/dev/null | awk '{print $2}')" != "$S3S_FS_VERSION" ]; then
      echo "installing s3s-fs@$S3S_FS_VERSION (crates.io) into $CACHE/s3s-fs" >&2
      cargo install -q "s3s-fs@$S3S_FS_VERSION" --features binary --locked --root "$CACHE/s3s-fs" >&2
    fi
    echo "$S3S_FS"
    ;;
  *)
    echo "usage: $0 install|path|install-s3s-fs" >&2
    exit 2
    ;;
esac
