#!/usr/bin/env bash
# Offload benchmark, run against two S3-compatible servers on 127.0.0.1 in turn: s3s-fs (crates.io,
# files on disk; a range GET costs the range, as on S3) and moto (PyPI, Python; a range GET reads
# the whole object). For each: the server's raw PUT and GET throughput and the offload layer alone
# (`magnetar perf object-store`, the offloader's own object_store client and settings), then a
# fresh release `magnetar standalone` offloading 1 GiB to it and one consumer catching up from
# object storage. Rewrites the offload section of docs/benchmarks.md (between the offload-bench
# markers).
#   usage: benches/run-offload-bench.sh [work-dir]   (default: target/offload-bench)
#   With perf installed (Debian's linux-perf), also records where the broker's CPU goes during
#   each catch-up read and lists the top symbols on the page.
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
S3S_FS=$(bash scripts/s3-server.sh install-s3s-fs | tail -1)
MOTO_VERSION=$("$(dirname "$MOTO")/python" -c 'import importlib.metadata as m; print(m.version("moto"))')
S3S_FS_VERSION=$("$S3S_FS" --version | awk '{print $2}')
. benches/bench-lib.sh

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

TOTAL_MIB=1024
LEDGER_MIB=128
MESSAGES=$((TOTAL_MIB * 16)) # 64 KiB messages
TOPIC=bench-offload
CORES=$(nproc)
MEM=$(awk '/^MemTotal/{printf "%.0f", $2/1024/1024}' /proc/meminfo)
DATE=$(date -u +%Y-%m-%d)

pct() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.0f %%", 100*a/b}'; }
verdict() { if [ "$(awk "BEGIN{print ($1)}")" = 1 ]; then echo "met"; else echo "**missed**"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_standalone() {
  "$BIN" standalone --data-dir "$DIR/data" --quic-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 \
    --broker-config "$DIR/broker.toml" > "$DIR/standalone.out" 2>> "$DIR/standalone.log" &
  SA=$!
  PIDS+=($SA)
  wait_standalone $SA "$DIR/standalone.out" "$DIR/standalone.log"
}
stop_standalone() {
  kill -INT $SA
  for _ in $(seq 1 600); do kill -0 $SA 2>/dev/null || break; sleep 0.1; done
  kill -KILL $SA 2>/dev/null || true
  wait $SA 2>/dev/null || true
}
CMDS=()
run() { CMDS+=("$*"); echo "== $*"; "$@"; }
last_cmd() { local c=${CMDS[-1]}; echo "${c/#$BIN/magnetar}"; }

DETAILS=""
# bench_server moto|s3s-fs: starts the server, measures it and Magnetar against it, adds rows to
# ROWS and a paragraph to DETAILS, stops the server.
bench_server() {
  local name=$1
  DIR=$WORK/$name
  mkdir -p "$DIR"
  local port label
  port=$(free_port)
  ENDPOINT=http://127.0.0.1:$port
  case $name in
    moto)
      CMDS+=("moto_server -H 127.0.0.1 -p $port   # moto[server]==$MOTO_VERSION, in memory")
      "$MOTO" -H 127.0.0.1 -p "$port" > "$DIR/server.log" 2>&1 &
      label="moto $MOTO_VERSION"
      ;;
    s3s-fs)
      mkdir -p "$DIR/s3/magnetar"
      CMDS+=("s3s-fs --host 127.0.0.1 --port $port --access-key bench --secret-key bench $DIR/s3   # s3s-fs@$S3S_FS_VERSION")
      "$S3S_FS" --host 127.0.0.1 --port "$port" --access-key bench --secret-key bench "$DIR/s3" > "$DIR/server.log" 2>&1 &
      label="s3s-fs $S3S_FS_VERSION"
      ;;
  esac
  local server=$!
  PIDS+=($server)
  for _ in $(seq 1 600); do curl -s -o /dev/null "$ENDPOINT/" && break; sleep 0.1; done
  if [ "$name" = moto ]; then curl -sf -X PUT "$ENDPOINT/magnetar" >/dev/null; fi
  cat > "$DIR/broker.toml" <<EOF
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

  run "$BIN" perf object-store --config "$DIR/broker.toml" --mib "$TOTAL_MIB" --object-mib "$LEDGER_MIB" --json "$DIR/raw.json"
  local raw_cmd offload_cmd catchup_cmd
  raw_cmd=$(last_cmd)
  local raw_put raw_get seg_w seg_r
  raw_put=$(jq '.put_mb_per_sec * 10 | floor / 10' "$DIR/raw.json")
  raw_get=$(jq '.get_mb_per_sec * 10 | floor / 10' "$DIR/raw.json")
  seg_w=$(jq '.segment_write_mb_per_sec * 10 | floor / 10' "$DIR/raw.json")
  seg_r=$(jq '.segment_read_mb_per_sec * 10 | floor / 10' "$DIR/raw.json")

  CMDS+=("magnetar standalone --data-dir $DIR/data --quic-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 --broker-config $DIR/broker.toml")
  start_standalone
  run "$BIN" perf produce "$TOPIC" --size 65536 -n "$MESSAGES" --warmup 0 --url "$URL" --tls-trust-cert "$CERT" --json "$DIR/produce.json"
  # A restart empties the broker's entry cache and closes the ledger being written. The same
  # consumer first reads everything from the bookies, for comparison in the same run.
  stop_standalone
  start_standalone
  run "$BIN" perf consume "$TOPIC" -s from-bookies --position earliest -n "$MESSAGES" --warmup 0 --url "$URL" --tls-trust-cert "$CERT" --json "$DIR/from-bookies.json"
  local from_bookies t0 t1 up_bytes up_ledgers bookie_left upload
  from_bookies=$(jq '.consumed.mb_per_sec * 10 | floor / 10' "$DIR/from-bookies.json")
  t0=$(date +%s.%N)
  run "$BIN" admin --url "$HTTP" topics offload "$TOPIC" --wait --timeout 20min
  offload_cmd=$(last_cmd)
  t1=$(date +%s.%N)
  "$BIN" admin --url "$HTTP" --json topics offload-status "$TOPIC" > "$DIR/offload.json"
  up_bytes=$(jq '.offloaded_bytes' "$DIR/offload.json")
  up_ledgers=$(jq '.offloaded_ledgers' "$DIR/offload.json")
  bookie_left=$(jq '.bookie_bytes' "$DIR/offload.json")
  upload=$(awk -v b="$up_bytes" -v a="$t0" -v z="$t1" 'BEGIN{printf "%.1f", b/1e6/(z-a)}')
  # Restart again, so that nothing the consumer reads comes from the entry cache.
  stop_standalone
  start_standalone
  local sa_cpu0 server_cpu0 w0 w1
  sa_cpu0=$(cpu_secs $SA)
  server_cpu0=$(cpu_secs $server)
  profile_start $SA "$DIR/catchup-profile"
  w0=$(date +%s.%N)
  if ! timed_cpu "$DIR/consume.cpu" run "$BIN" perf consume "$TOPIC" -s catchup --position earliest -n "$MESSAGES" --warmup 0 --url "$URL" --tls-trust-cert "$CERT" --json "$DIR/catchup.json"; then
    cat "$DIR/consume.cpu.time" >&2
    exit 1
  fi
  w1=$(date +%s.%N)
  catchup_cmd=$(last_cmd)
  local sa_cpu server_cpu consumer_cpu wall catchup check gets
  sa_cpu=$(awk -v a="$sa_cpu0" -v b="$(cpu_secs $SA)" 'BEGIN{printf "%.1f", b-a}')
  server_cpu=$(awk -v a="$server_cpu0" -v b="$(cpu_secs $server)" 'BEGIN{printf "%.1f", b-a}')
  consumer_cpu=$(cat "$DIR/consume.cpu")
  wall=$(awk -v a="$w0" -v b="$w1" 'BEGIN{printf "%.1f", b-a}')
  profile_stop "$DIR/catchup-profile"
  catchup=$(jq '.consumed.mb_per_sec * 10 | floor / 10' "$DIR/catchup.json")
  check=$(jq -r '.check | "\(.messages) consumed, \(.gaps) gaps, \(.duplicates) duplicates"' "$DIR/catchup.json")
  gets=$(curl -s "$HTTP/metrics" | awk -F' ' '/^magnetar_broker_offload_store_requests_total\{op="get"\}/{print $2}')
  stop_standalone
  kill -KILL $server 2>/dev/null || true
  wait $server 2>/dev/null || true
  rm -rf "$DIR/data" "$DIR/s3"

  local objects_mib
  objects_mib=$(awk -v b="$up_bytes" 'BEGIN{printf "%.0f", b/1048576}')
  summary_row "offload ($label): upload of $up_ledgers ledgers, $objects_mib MiB of objects" "$upload MB/s" "PUT $raw_put MB/s" "$(pct "$upload" "$raw_put")" ">= 80 %: $(verdict "$upload >= 0.8 * $raw_put")" "$offload_cmd"
  summary_row "offload ($label): catch-up read of 1 GiB, one consumer, end to end" "$catchup MB/s" "GET $raw_get MB/s" "$(pct "$catchup" "$raw_get")" ">= 80 %: $(verdict "$catchup >= 0.8 * $raw_get")" "$catchup_cmd"
  summary_row "offload ($label): offload layer alone, segments written" "$seg_w MB/s" "PUT $raw_put MB/s" "$(pct "$seg_w" "$raw_put")" "" "$raw_cmd"
  summary_row "offload ($label): offload layer alone, segments read in order and verified" "$seg_r MB/s" "GET $raw_get MB/s" "$(pct "$seg_r" "$raw_get")" "" "$raw_cmd"
  DETAILS+="- **$label**: consumer check $check; bytes left on bookies after the offload: $bookie_left;
  GET requests the broker made while reading (index and data): ${gets:-unknown}. The same consumer
  reading the same 1 GiB from the bookies (before the offload, after a restart): $from_bookies MB/s.
  CPU used during the catch-up read ($wall s of wall time, $(awk -v w="$wall" -v c="$CORES" 'BEGIN{printf "%.1f", w*c}') CPU-seconds on $CORES cores):
  broker (standalone) $sa_cpu s, $name $server_cpu s, consumer $consumer_cpu s.
"
  if [ -s "$DIR/catchup-profile.line" ]; then
    DETAILS+="  Where the broker's CPU went during the catch-up (\`perf record -e cpu-clock\`, top symbols):
  $(cat "$DIR/catchup-profile.line").
"
  fi
}

bench_server s3s-fs
bench_server moto
cleanup
trap - EXIT

CMD_BLOCK=$(printf '%s\n' "${CMDS[@]/#$BIN/magnetar}")
SECTION=$(cat <<MD
<!-- offload-bench:start -->
## Object storage (offload and catch-up reads)

Produced by \`benches/run-offload-bench.sh\` on $DATE; machine: $CORES cores, $MEM GiB memory.
Two S3-compatible servers on the same machine, in turn: s3s-fs $S3S_FS_VERSION (Rust, objects
as files: a range GET costs the range, as on S3) and moto $MOTO_VERSION (Python, in memory: a
range GET reads the whole object first). The baselines are each server's raw throughput measured
in the same run with the offloader's own object_store client and settings
(\`magnetar perf object-store\`: $TOTAL_MIB MiB in objects of $LEDGER_MIB MiB, multipart parts of
8 MiB, 4 in flight; GETs one whole object at a time, streamed, bytes counted and dropped). The
same command then writes the same bytes as segments of 64 KiB entries through the offload layer
and reads them back in order, without broker or network. End to end: a release
\`magnetar standalone\` with ledgers of $LEDGER_MIB MiB, 1 GiB produced in 64 KiB messages,
restarted (closing the last ledger), offloaded on request (\`magnetar admin topics offload
--wait\`, timed from the request to the last ledger recorded), restarted (an empty entry cache),
then one consumer reading everything from the earliest message over QUIC.

The figures, the baselines and the verdicts are in the summary table at the top of this page.

$DETAILS
Commands:

\`\`\`
$CMD_BLOCK
\`\`\`

Notes:
- A catch-up reader streams each segment with one GET from where it reads to the end (the whole
  object from the start), delivered into a byte-bounded LRU block cache at most
  \`offload.read_ahead_bytes\` ahead of the reader; the connection's flow control holds the rest.
  Opening a segment costs one more GET (index and footer, a suffix range), which on moto reads the
  whole object again.
- Uploading reads each ledger from the bookie (one read ahead) while its parts upload; the raw PUT
  baseline only sends bytes from memory. Consumer figures are payload bytes (64 KiB messages);
  objects also hold entry and batch headers and the index.
- The server, the broker and the consumer share the same $CORES cores, so every end-to-end figure
  is shared CPU (see the CPU lines above). The raw GET baseline is one client that drops the bytes;
  the consumer's path also verifies every entry, dispatches it and sends it over QUIC (TLS), which
  is why its ceiling is the broker's delivery rate from any source (the from-bookies figure),
  not the store's. On real S3 one connection gives about 100 MB/s and the server costs this
  machine nothing.
<!-- offload-bench:end -->
MD
)
write_section "$OUT" offload-bench "$SECTION" broker-bench
publish_summary offload "$OUT"
echo "wrote $OUT"
