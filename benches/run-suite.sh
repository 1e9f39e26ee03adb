#!/usr/bin/env bash
# The benchmark suite: the bookie benchmark, the broker benchmark (standalone over QUIC), then the
# offload benchmark (standalone and two S3-compatible servers), each measuring its baselines in the
# same run and rewriting its rows of the summary table and its section of docs/benchmarks.md. The
# suite's own duration (release build included; target: under 15 minutes) goes into the summary.
#   usage: benches/run-suite.sh
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash benches/run-bookie-bench.sh
bash benches/run-broker-bench.sh
bash benches/run-offload-bench.sh
secs=$(( $(date +%s) - start ))
mkdir -p docs/bench-data
echo "$(date -u +%Y-%m-%d) $secs" > docs/bench-data/suite.txt
. benches/bench-lib.sh
rebuild_summary docs/benchmarks.md
echo "suite finished in $secs s"
