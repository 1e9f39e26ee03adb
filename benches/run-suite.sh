#!/usr/bin/env bash
# The benchmark suite: the bookie benchmark, the broker benchmark (standalone over QUIC), then the
# offload benchmark (standalone and an S3-compatible server),
# each measuring its baselines in the same run and rewriting its section of docs/benchmarks.md.
#   usage: benches/run-suite.sh
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash benches/run-bookie-bench.sh
bash benches/run-broker-bench.sh
bash benches/run-offload-bench.sh
echo "suite finished in $(( $(date +%s) - start )) s"
