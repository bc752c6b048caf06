#!/usr/bin/env bash
# NBD server vs `nbdkit file` on the same file, same run: 4k random read QD32,
# 1 MiB sequential read, 4k random read QD32 with 1 ms read latency on both
# sides (our delay layer vs nbdkit's delay filter).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
BIN=${VMTHUNDER_BIN:-$here/../../bin/vmthunder}
dir=$(mktemp -d /dev/shm/vmt-bench-nbd.XXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
img=$dir/disk.img
dd if=/dev/urandom of="$img" bs=1M count=1024 status=none

serve() { # NAME DELAY
  local sock=$dir/$1.sock
  case $1 in
    ours*) "$BIN" export --readonly --socket "$sock" ${2:+--delay-read "$2"} "$img" >/dev/null 2>&1 & ;;
    nbdkit*) nbdkit -f -r -U "$sock" ${2:+--filter=delay} file "$img" ${2:+rdelay=$2} >/dev/null 2>&1 & ;;
  esac
  pids+=($!)
  wait_sock "$sock"
}

serve ours ""; serve nbdkit ""; serve ours-delay 1ms; serve nbdkit-delay 1ms
u() { echo "nbd+unix:///?socket=$dir/$1.sock"; }
ours=$(u ours); kit=$(u nbdkit); oursd=$(u ours-delay); kitd=$(u nbdkit-delay)

header nbdkit
read -r o _ < <(fio_nbd "$ours" randread 4k 32); read -r a _ < <(fio_nbd "$kit" randread 4k 32)
row "4k randread QD32" "$o" "$a" IOPS
read -r _ o < <(fio_nbd "$ours" read 1M 4); read -r _ a < <(fio_nbd "$kit" read 1M 4)
row "1M seqread QD4" "$o" "$a" MiB/s
read -r o _ < <(fio_nbd "$oursd" randread 4k 32); read -r a _ < <(fio_nbd "$kitd" randread 4k 32)
row "4k randread QD32 +1ms read delay" "$o" "$a" IOPS
