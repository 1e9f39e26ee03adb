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
