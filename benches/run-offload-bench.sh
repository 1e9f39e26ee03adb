#!/usr/bin/env bash
# Offload benchmark: an S3-compatible server (moto, from scripts/s3-server.sh) on 127.0.0.1, its raw
# PUT and GET throughput measured with the offloader's own object_store client
# (`magnetar perf object-store`), then a fresh release `magnetar standalone` offloading 1 GiB to it
# and one consumer catching up from object storage, in one run. Rewrites the offload section of
# docs/benchmarks.md (between the offload-bench markers).
#   usage: benches/run-offload-bench.sh [work-dir]   (default: target/offload-bench)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=${1:-$ROOT/target/offload-bench}
OUT=$ROOT/docs/benchmarks.md
rm -rf "$WORK" && mkdir -p "$WORK"
command -v jq >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq jq >/dev/null; }
command -v curl >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null; }

cargo build --release --locked -p magnetar-cli
BIN=$ROOT/target/release/magnetar
MOTO=$(bash scripts/s3-server.sh install | tail -1)
. benches/bench-lib.sh

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

S3_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$MOTO" -H 127.0.0.1 -p "$S3_PORT" > "$WORK/moto.log" 2>&1 &
PIDS+=($!)
ENDPOINT=http://127.0.0.1:$S3_PORT
for _ in $(seq 1 600); do curl -sf "$ENDPOINT/" >/dev/null 2>&1 && break; sleep 0.1; done
curl -sf -X PUT "$ENDPOINT/magnetar" >/dev/null
MOTO_VERSION=$("$(dirname "$MOTO")/python" -c 'import importlib.metadata as m; print(m.version("moto"))')

TOTAL_MIB=1024
LEDGER_MIB=128
cat > "$WORK/broker.toml" <<EOF
[ledger]
rollover_max_bytes = "${LEDGER_MIB}MiB"

[offload]
url = "s3://magnetar/bench"
endpoint = "$ENDPOINT"
region = "us-east-1"
path_style = true
allow_http = true
access_key_id = "bench"
secret_access_key = "bench"

[offload_policy]
deletion_lag = "0s"
check_interval = "1s"
EOF

echo "== baseline: magnetar perf object-store --config $WORK/broker.toml --mib $TOTAL_MIB --object-mib $LEDGER_MIB"
"$BIN" perf object-store --config "$WORK/broker.toml" --mib "$TOTAL_MIB" --object-mib "$LEDGER_MIB" --json "$WORK/raw.json"
RAW_PUT=$(jq '.put_mb_per_sec * 10 | floor / 10' "$WORK/raw.json")
RAW_GET=$(jq '.get_mb_per_sec * 10 | floor / 10' "$WORK/raw.json")
RAW_RANGE=$(jq '.range_get_mb_per_sec * 10 | floor / 10' "$WORK/raw.json")
RANGE_MIB=$(jq '.range_bytes / 1048576 | floor' "$WORK/raw.json")

STANDALONE_CMD="magnetar standalone --data-dir $WORK/data --quic-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 --broker-config $WORK/broker.toml"
start_standalone() {
  "$BIN" standalone --data-dir "$WORK/data" --quic-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 \
    --broker-config "$WORK/broker.toml" > "$WORK/standalone.out" 2>> "$WORK/standalone.log" &
  SA=$!
  PIDS+=($SA)
  for _ in $(seq 1 300); do
    grep -q '^Try:' "$WORK/standalone.out" && break
    kill -0 $SA 2>/dev/null || { echo "standalone exited:" >&2; cat "$WORK/standalone.log" >&2; exit 1; }
    sleep 0.1
  done
  grep -q '^Try:' "$WORK/standalone.out" || { echo "standalone not ready after 30 s" >&2; exit 1; }
  URL=$(sed -n 's|^  clients (QUIC/UDP): ||p' "$WORK/standalone.out")
  CERT=$(sed -n 's|^  TLS certificate: ||p' "$WORK/standalone.out")
  HTTP=$(sed -n 's|^  HTTP (/health, /metrics): ||p' "$WORK/standalone.out")
}
stop_standalone() {
  kill -INT $SA
  for _ in $(seq 1 600); do kill -0 $SA 2>/dev/null || break; sleep 0.1; done
  kill -KILL $SA 2>/dev/null || true
  wait $SA 2>/dev/null || true
}
CMDS=()
run() { CMDS+=("$*"); echo "== $*"; "$@"; }

echo "== $STANDALONE_CMD"
start_standalone
TOPIC=bench-offload
MESSAGES=$(( TOTAL_MIB * 16 )) # 64 KiB messages
run "$BIN" perf produce "$TOPIC" --size 65536 -n "$MESSAGES" --warmup 0 --url "$URL" --tls-trust-cert "$CERT" --json "$WORK/produce.json"
# A restart empties the broker's entry cache and closes the ledger being written. The same
# consumer first reads everything from the bookies, for comparison in the same run.
stop_standalone
start_standalone
run "$BIN" perf consume "$TOPIC" -s from-bookies --position earliest -n "$MESSAGES" --warmup 0 --url "$URL" --tls-trust-cert "$CERT" --json "$WORK/from-bookies.json"
FROM_BOOKIES=$(jq '.consumed.mb_per_sec * 10 | floor / 10' "$WORK/from-bookies.json")
T0=$(date +%s.%N)
run "$BIN" admin --url "$HTTP" topics offload "$TOPIC" --wait --timeout 20min
T1=$(date +%s.%N)
"$BIN" admin --url "$HTTP" --json topics offload-status "$TOPIC" > "$WORK/offload.json"
UP_BYTES=$(jq '.offloaded_bytes' "$WORK/offload.json")
UP_LEDGERS=$(jq '.offloaded_ledgers' "$WORK/offload.json")
BOOKIE_LEFT=$(jq '.bookie_bytes' "$WORK/offload.json")
UPLOAD=$(awk -v b="$UP_BYTES" -v a="$T0" -v z="$T1" 'BEGIN{printf "%.1f", b/1e6/(z-a)}')
# Restart again, so that nothing the consumer reads comes from the entry cache.
stop_standalone
start_standalone
run "$BIN" perf consume "$TOPIC" -s catchup --position earliest -n "$MESSAGES" --warmup 0 --url "$URL" --tls-trust-cert "$CERT" --json "$WORK/catchup.json"
CATCHUP=$(jq '.consumed.mb_per_sec * 10 | floor / 10' "$WORK/catchup.json")
CHECK=$(jq -r '.check | "\(.messages) consumed, \(.gaps) gaps, \(.duplicates) duplicates"' "$WORK/catchup.json")
GETS=$(curl -s "$HTTP/metrics" | awk -F' ' '/^magnetar_broker_offload_store_requests_total\{op="get"\}/{print $2}')
stop_standalone
cleanup
trap - EXIT
rm -rf "$WORK/data"

pct() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.0f %%", 100*a/b}'; }
verdict() { if [ "$(awk "BEGIN{print ($1)}")" = 1 ]; then echo "met"; else echo "**missed**"; fi; }
VUP=$(verdict "$UPLOAD >= 0.8 * $RAW_PUT")
VGET=$(verdict "$CATCHUP >= 0.8 * $RAW_GET")
CORES=$(nproc)
MEM=$(awk '/^MemTotal/{printf "%.0f", $2/1024/1024}' /proc/meminfo)
DATE=$(date -u +%Y-%m-%d)
CMD_BLOCK=$(printf '%s\n' "moto_server -H 127.0.0.1 -p $S3_PORT   # moto[server]==$MOTO_VERSION, in memory" \
  "magnetar perf object-store --config $WORK/broker.toml --mib $TOTAL_MIB --object-mib $LEDGER_MIB --json $WORK/raw.json" \
  "$STANDALONE_CMD" "${CMDS[@]/#$BIN/magnetar}")

SECTION=$(cat <<MD
<!-- offload-bench:start -->
## Object storage (offload and catch-up reads)

Produced by \`benches/run-offload-bench.sh\` on $DATE; machine: $CORES cores, $MEM GiB memory.
The S3-compatible server is moto $MOTO_VERSION (in memory, Python) on the same machine; the
baseline is its raw throughput measured in the same run with the offloader's own object_store
client and settings (\`magnetar perf object-store\`: $TOTAL_MIB MiB in objects of $LEDGER_MIB MiB,
multipart parts of 8 MiB, 4 in flight; GETs one object at a time, streamed). Magnetar: a release
\`magnetar standalone\` with ledgers of $LEDGER_MIB MiB, 1 GiB produced in 64 KiB messages, restarted
(closing the last ledger), offloaded on request (\`magnetar admin topics offload --wait\`, timed from the request to the last ledger
recorded), restarted (an empty entry cache), then one consumer reading everything from the
earliest message.

| scenario | Magnetar | baseline (raw, same server, same run) | ratio | target (issue 6) |
|---|---|---|---|---|
| offload upload: $UP_LEDGERS ledgers, $(awk -v b="$UP_BYTES" 'BEGIN{printf "%.0f", b/1048576}') MiB of objects | $UPLOAD MB/s | PUT $RAW_PUT MB/s | $(pct "$UPLOAD" "$RAW_PUT") | >= 80 %: $VUP |
| catch-up read of 1 GiB from object storage, one consumer | $CATCHUP MB/s | GET $RAW_GET MB/s (whole objects); GET in sequential ranges of $RANGE_MIB MiB, the reader's request size: $RAW_RANGE MB/s | $(pct "$CATCHUP" "$RAW_GET") of whole-object GETs; $(pct "$CATCHUP" "$RAW_RANGE") of range GETs | >= 80 % of GET: $VGET |

Consumer check: $CHECK; bytes left on bookies after the offload: $BOOKIE_LEFT; GET requests
the broker made while reading (index and data): ${GETS:-unknown}. The same consumer reading the
same 1 GiB from the bookies (before the offload, after a restart): $FROM_BOOKIES MB/s.

Commands:

\`\`\`
$CMD_BLOCK
\`\`\`

Notes:
- Uploading reads each ledger from the bookie (one read ahead) while its parts upload; the raw PUT
  baseline only sends bytes from memory. The catch-up consumer's figure is payload bytes (64 KiB
  messages); objects also hold entry and batch headers and the index.
- Catch-up reads fetch \`offload.read_ahead_bytes\` per range GET (one prefetch ahead), so they are
  bounded by the store's range-GET throughput, measured here too. moto keeps each object beyond
  5 MiB in a temporary file and serves a range GET by reading the whole object first
  (\`FakeKey.value\` in moto/s3/models.py), so its cost grows with the object, not the range: that
  is why its range GETs are so much slower than whole-object GETs.
  On S3 a range GET costs the range; there, several range GETs in flight per reader (not done yet)
  would be the way to a single consumer's full bandwidth.
- moto, Magnetar and the load generator share the same 2 cores, so each figure is shared CPU, and
  moto's Python server is usually the ceiling. On real S3 both sides scale with parallelism.
<!-- offload-bench:end -->
MD
)
write_section "$OUT" offload-bench "$SECTION" broker-bench
