#!/usr/bin/env bash
# Shared by the benchmark scripts (sourced, not run).

# dd_baseline DIR: durable sequential write bandwidth, `dd bs=1M count=1024 conv=fdatasync`, three
# times (the virtual disk varies a lot from run to run). Sets DD_ALL (the runs) and DD_MBS (median).
dd_baseline() {
  echo "== baseline: dd bs=1M count=1024 conv=fdatasync (median of 3)"
  DD_ALL=""
  local line bytes secs
  for _ in 1 2 3; do
    line=$(dd if=/dev/zero of="$1/dd.bin" bs=1M count=1024 conv=fdatasync 2>&1 | tail -1)
    rm -f "$1/dd.bin"
    bytes=$(echo "$line" | awk '{print $1}')
    secs=$(echo "$line" | awk -F', ' '{print $3}' | awk '{print $1}')
    DD_ALL="$DD_ALL $(awk -v b="$bytes" -v s="$secs" 'BEGIN{printf "%.1f", b/s/1e6}')"
  done
  DD_MBS=$(echo $DD_ALL | tr ' ' '\n' | sort -n | sed -n 2p)
  echo "   runs:$DD_ALL MB/s; median $DD_MBS MB/s"
}

# fsync_baseline DIR MB_PER_SEC: the disk's own fdatasync latency for a journal-shaped load, with
# fio (Debian's, installed when missing): 128 KiB writes at MB_PER_SEC into a fresh file, each
# followed by an fdatasync, for 15 s; once alone and once beside a second stream at the same rate
# (1 MiB buffered writes, started with sync_file_range, as the bookie's flusher writes entry logs).
# A publish waits for at least one such fdatasync after its record is written, so these are the
# floor of its latency on this disk; the line also gives the share of the run in which the
# fdatasync in progress had more than 10 ms left (records arriving then wait longer than that
# before theirs starts). Sets FSYNC_ALONE and FSYNC_BESIDE to "p50 X ms, p99 Y ms,
# p99.9 Z ms, max W ms" (or why it was not measured), and FSYNC_CMD to the command.
fsync_baseline() { # DIR MB_PER_SEC
  local dir=$1 rate=$2
  local common=(--ioengine=sync --time_based --runtime=15 --output-format=json+)
  local journal=(--name=journal "--filename=$dir/fio-journal" --size=1G --bs=128k --rw=write --fdatasync=1 "--rate=${rate}m")
  local entrylog=(--name=entrylog "--filename=$dir/fio-entrylog" --size=2G --bs=1m --rw=write "--rate=${rate}m" --sync_file_range=write:1)
  FSYNC_CMD="fio ${common[*]} ${journal[*]} [${entrylog[*]}]"
  command -v fio >/dev/null ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null; } || true
  if ! command -v fio >/dev/null; then
    FSYNC_ALONE="not measured (fio could not be installed)"; FSYNC_BESIDE=$FSYNC_ALONE; return 0
  fi
  local how
  for how in alone beside; do
    echo "== baseline: journal-shaped fdatasync latency at $rate MB/s, $how"
    local jobs=("${journal[@]}")
    [ "$how" = beside ] && jobs+=("${entrylog[@]}")
    rm -f "$dir"/fio-journal "$dir"/fio-entrylog
    if fio "${common[@]}" "${jobs[@]}" > "$dir/fsync-$how.json" 2> "$dir/fsync-$how.err"; then
      python3 - "$dir/fsync-$how.json" > "$dir/fsync-$how.line" <<'PY'
import json, sys
job = next(j for j in json.load(open(sys.argv[1]))["jobs"] if j["jobname"] == "journal")
lat = job["sync"]["lat_ns"]
p = lat["percentile"]
ms = lambda ns: "%.1f ms" % (ns / 1e6)
# A record written at a random moment waits for the fdatasync in progress before its own: the
# share of the run in which the one in progress had more than 10 ms left is the share of records
# that wait longer than that before their own fdatasync even starts.
over = sum(n * max(0, int(ns) - 10_000_000) for ns, n in lat["bins"].items())
share = 100 * over / (job["job_runtime"] * 1e6)
print("p50 %s, p99 %s, p99.9 %s, max %s over %d fdatasyncs; %.2f %% of the time one had more than 10 ms left" % (
    ms(p["50.000000"]), ms(p["99.000000"]), ms(p["99.900000"]), ms(lat["max"]), lat["N"], share))
PY
    else
      cat "$dir/fsync-$how.err" >&2
      echo "not measured (fio failed)" > "$dir/fsync-$how.line"
    fi
    rm -f "$dir"/fio-journal "$dir"/fio-entrylog
    echo "   $(cat "$dir/fsync-$how.line")"
  done
  FSYNC_ALONE=$(cat "$dir/fsync-alone.line")
  FSYNC_BESIDE=$(cat "$dir/fsync-beside.line")
}

# write_section FILE NAME TEXT [AFTER]: puts TEXT (which starts with `<!-- NAME:start -->` and ends
# with `<!-- NAME:end -->`) into FILE in place of the old section of that name; a new section goes
# after the `<!-- AFTER:end -->` marker when there is one, else at the end. Creates FILE (the
# page's title and preamble) when missing.
write_section() {
  local file=$1 name=$2 text=$3 after=${4:-}
  if [ ! -f "$file" ]; then
    { echo "# Benchmarks"; echo; echo "Every figure on this page is written by a script in \`benches/\`; none is typed by hand."; } > "$file"
  fi
  python3 - "$file" "$name" "$text" "$after" <<'PY'
import re, sys
path, name, text, after = sys.argv[1:5]
s = open(path).read()
pat = re.compile(r"<!-- %s:start -->.*?<!-- %s:end -->" % (re.escape(name), re.escape(name)), re.S)
if pat.search(s):
    s = pat.sub(lambda m: text, s, count=1)
elif after and "<!-- %s:end -->" % after in s:
    i = s.index("<!-- %s:end -->" % after) + len("<!-- %s:end -->" % after)
    s = s[:i] + "\n\n" + text + s[i:]
else:
    s = s.rstrip("\n") + "\n\n" + text + "\n"
open(path, "w").write(s if s.endswith("\n") else s + "\n")
PY
  echo "wrote $file"
}

# wait_standalone PID OUT LOG: waits (30 s at most) until the `magnetar standalone` with PID has
# printed its addresses to OUT, then sets URL, CERT and HTTP from them; exits with LOG shown if
# the process dies first.
wait_standalone() {
  local pid=$1 out=$2 log=$3
  for _ in $(seq 1 300); do
    grep -q '^Try:' "$out" && break
    kill -0 "$pid" 2>/dev/null || { echo "standalone exited:" >&2; cat "$log" >&2; exit 1; }
    sleep 0.1
  done
  grep -q '^Try:' "$out" || { echo "standalone not ready after 30 s" >&2; exit 1; }
  URL=$(sed -n 's|^  clients (QUIC/UDP): ||p' "$out")
  CERT=$(sed -n 's|^  TLS certificate: ||p' "$out")
  HTTP=$(sed -n 's|^  HTTP (/health, /metrics): ||p' "$out")
}

# The summary table at the top of docs/benchmarks.md: one row per measured figure. A script adds
# its rows with `summary_row`, then `publish_summary NAME FILE` stores them (with the date and the
# machine) in docs/bench-data/NAME.tsv and rebuilds the table from every stored file, so a script
# run alone replaces only its own rows.
SUMMARY_ROWS=()
summary_row() { # SCENARIO FIGURE BASELINE RATIO TARGET COMMAND
  local IFS=$'\t'
  SUMMARY_ROWS+=("$*")
}
publish_summary() { # NAME FILE
  local name=$1 file=$2 data machine day
  data=$(dirname "$file")/bench-data
  mkdir -p "$data"
  day=$(date -u +%Y-%m-%d)
  machine="$(nproc) cores, $(awk '/^MemTotal/{printf "%.0f", $2/1024/1024}' /proc/meminfo) GiB"
  : > "$data/$name.tsv"
  local r
  for r in "${SUMMARY_ROWS[@]}"; do printf '%s\t%s\t%s\n' "$r" "$day" "$machine" >> "$data/$name.tsv"; done
  rebuild_summary "$file"
}
rebuild_summary() { # FILE
  python3 - "$1" <<'PY'
import os, re, sys
path = sys.argv[1]
data = os.path.join(os.path.dirname(path), "bench-data")
order = ["bookie", "broker", "offload"]
names = sorted((f[:-4] for f in os.listdir(data) if f.endswith(".tsv")),
               key=lambda n: (order.index(n) if n in order else len(order), n))
rows = []
for n in names:
    for line in open(os.path.join(data, n + ".tsv")):
        cells = line.rstrip("\n").split("\t")
        if len(cells) != 8:
            sys.exit("%s.tsv: a row with %d cells, not 8: %r" % (n, len(cells), line))
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
suite = os.path.join(data, "suite.txt")
if os.path.exists(suite):
    day, secs = open(suite).read().split()
    secs = int(secs)
    verdict = "met" if secs < 15 * 60 else "**missed**"
    last = "The last full run of `benches/run-suite.sh` (release build, all three scripts) took %d min %d s on %s (target: under 15 min: %s)." % (secs // 60, secs % 60, day, verdict)
else:
    last = "`benches/run-suite.sh` has not recorded a full run yet."
text = """<!-- summary:start -->
## Summary

One row per figure. Every script in `benches/` measures its baselines on the same machine in the
same run, writes its rows to `docs/bench-data/` and rebuilds this table; the sections below give
the set-up, the full commands, and what limits each missed target. %s

| scenario | Magnetar | baseline | ratio | target | command | date | machine |
|---|---|---|---|---|---|---|---|
%s
<!-- summary:end -->""" % (last, "\n".join(rows))
s = open(path).read()
pat = re.compile(r"<!-- summary:start -->.*?<!-- summary:end -->", re.S)
if pat.search(s):
    s = pat.sub(lambda m: text, s, count=1)
elif "<!-- " in s:
    i = s.index("<!-- ")
    s = s[:i] + text + "\n\n" + s[i:]
else:
    s = s.rstrip("\n") + "\n\n" + text + "\n"
open(path, "w").write(s)
PY
}

# prom_histogram BEFORE AFTER NAME: from two /metrics scrapes, the observations of histogram NAME
# made between them: "count N, mean X ms, p50 <= A ms, p99 <= B ms" (bucket upper bounds).
prom_histogram() {
  python3 - "$1" "$2" "$3" <<'PY'
import re, sys
def read(path, name):
    buckets, count, total = {}, 0.0, 0.0
    for line in open(path):
        m = re.match(r'%s_bucket\{le="([^"]+)"\} (\S+)' % re.escape(name), line)
        if m:
            buckets[float(m.group(1))] = float(m.group(2))
        elif line.startswith(name + "_count"):
            count = float(line.split()[-1])
        elif line.startswith(name + "_sum"):
            total = float(line.split()[-1])
    return buckets, count, total
b0, c0, s0 = read(sys.argv[1], sys.argv[3])
b1, c1, s1 = read(sys.argv[2], sys.argv[3])
n = c1 - c0
if n <= 0:
    print("no observations")
    sys.exit()
def q(p):
    for le in sorted(b1):
        if b1[le] - b0.get(le, 0) >= p * n:
            return "%.2f ms" % (le * 1000) if le != float("inf") else "beyond the last bucket"
fmt = lambda v: "%.2f ms" % (v * 1000)
print("%d, mean %s, p50 <= %s, p99 <= %s, p99.9 <= %s" % (n, fmt((s1 - s0) / n), q(0.5), q(0.99), q(0.999)))
PY
}

# prom_counter FILE NAME: a counter's value in one /metrics scrape (0 when absent).
prom_counter() {
  awk -v n="$2" '$1 == n || $1 == n"_total" {print $2; found=1} END{if (!found) print 0}' "$1"
}

# profile_start PID OUT: records where process PID spends its CPU (`perf record -e cpu-clock`, in
# the background) until `profile_stop OUT`, which writes the report to OUT.txt and its top ten
# symbols, as one line, to OUT.line. Both do nothing when perf is missing.
profile_start() { # PID OUT
  PROFILE_PID=""
  type -P perf >/dev/null || return 0
  command perf record -e cpu-clock -F 999 -p "$1" -o "$2.data" >/dev/null 2>&1 &
  PROFILE_PID=$!
}
profile_stop() { # OUT
  [ -n "${PROFILE_PID:-}" ] || return 0
  kill -INT "$PROFILE_PID" 2>/dev/null || true
  wait "$PROFILE_PID" 2>/dev/null || true
  PROFILE_PID=""
  command perf report -i "$1.data" --no-children --sort symbol --stdio 2>/dev/null | tr -d '\000' \
    | awk '!/^#/ && $1 ~ /%$/ {p = $1; $1 = ""; $2 = ""; sub(/^ +/, ""); sub(/( +-)+ *$/, ""); print p " " $0}' > "$1.txt" || true
  head -10 "$1.txt" | paste -sd, - | sed 's/,/, /g' > "$1.line"
  rm -f "$1.data"
}

# cpu_secs PID: CPU seconds (user + system) a live process has used so far, from /proc.
cpu_secs() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat"; }

# prom_delta BEFORE AFTER NAME: how much counter NAME grew between two /metrics scrapes.
prom_delta() {
  awk -v a="$(prom_counter "$1" "$3")" -v b="$(prom_counter "$2" "$3")" 'BEGIN{print b - a}'
}

# cpu_run PID LABEL OUT COMMAND...: runs COMMAND (the load generator) and writes to OUT the CPU
# seconds used meanwhile by the server PID (called LABEL) and by COMMAND, against wall time x cores.
cpu_run() {
  local pid=$1 label=$2 out=$3 cpu0 w0 w1 rc=0
  shift 3
  cpu0=$(cpu_secs "$pid"); w0=$(date +%s.%N)
  timed_cpu "$out.gen" "$@" || rc=$?
  w1=$(date +%s.%N)
  awk -v a="$cpu0" -v b="$(cpu_secs "$pid")" -v w0="$w0" -v w1="$w1" -v c="$(nproc)" -v g="$(cat "$out.gen")" -v l="$label" \
    'BEGIN{printf "%s %.1f s, load generator %.1f s, of %.1f CPU-seconds (%.1f s on %d cores)", l, b-a, g, (w1-w0)*c, w1-w0, c}' > "$out"
  return $rc
}

# timed_cpu OUT COMMAND...: runs COMMAND, writing the CPU seconds it used (user + system) to OUT.
timed_cpu() {
  local out=$1; shift
  local TIMEFORMAT='%U %S' rc=0
  { time "$@" 2>&1; } 2> "$out.time" || rc=$?
  tail -1 "$out.time" | awk '{printf "%.1f", $1 + $2}' > "$out"
  return $rc
}

# sched_probe_start OUT: measures how late the machine wakes a sleeping thread, in the background
# until `sched_probe_stop OUT`: cyclictest (Debian rt-tests, installed when missing), one ordinary
# (SCHED_OTHER) thread per core waking every 1 ms, histogram in microseconds. Run beside a latency
# benchmark it shows the scheduling delay every thread of that run was exposed to (hypervisor
# preemption and steal included). `sched_probe_stop OUT` stops it and writes
# "p99 X ms, p99.9 Y ms, max Z ms" (over all cores' wake-ups) to OUT.line, or why it could not.
SCHED_PROBE_CMD="cyclictest --threads=$(nproc) --affinity --interval=1000 --quiet --histogram=100000"
sched_probe_start() { # OUT
  SCHED_PID=""
  command -v cyclictest >/dev/null ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rt-tests >/dev/null; } || true
  if ! command -v cyclictest >/dev/null; then
    echo "not measured (cyclictest could not be installed)" > "$1.line"
    return 0
  fi
  $SCHED_PROBE_CMD > "$1.txt" 2> "$1.err" &
  SCHED_PID=$!
}
sched_probe_stop() { # OUT
  [ -n "${SCHED_PID:-}" ] || return 0
  kill -INT "$SCHED_PID" 2>/dev/null || true # it prints its histogram and exits
  if ! wait "$SCHED_PID"; then
    echo "cyclictest failed:" >&2; cat "$1.err" >&2
    echo "not measured (cyclictest failed)" > "$1.line"; SCHED_PID=""; return 0
  fi
  SCHED_PID=""
  # Histogram rows, in ascending order: "<us> <count core 0> <count core 1> ..."; read twice
  # (totals, then percentiles). Wake-ups past the histogram (100 ms) show in the max.
  awk 'NR == FNR {if ($1 ~ /^[0-9]+$/) for (i = 2; i <= NF; i++) total += $i; next}
       /^# Max Latencies:/ {for (i = 4; i <= NF; i++) if ($i + 0 > max) max = $i + 0}
       $1 ~ /^[0-9]+$/ {
         for (i = 2; i <= NF; i++) acc += $i
         if (p99 == "" && acc >= 0.99 * total) p99 = $1 + 0
         if (p999 == "" && acc >= 0.999 * total) p999 = $1 + 0
       }
       END {
         if (total == 0) exit 1
         printf "p99 %.2f ms, p99.9 %.2f ms, max %.1f ms", p99 / 1000, p999 / 1000, max / 1000
       }' "$1.txt" "$1.txt" > "$1.line" ||
    { grep '^#' "$1.txt" >&2; echo "not measured (cyclictest printed no histogram)" > "$1.line"; }
}
