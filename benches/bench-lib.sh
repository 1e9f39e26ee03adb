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
