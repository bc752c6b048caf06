#!/usr/bin/env bash
# bench-cache: the cache stack (vmthunder export --cache DIR --cow FILE)
# against nbdkit's file plugin on the same data, both over a unix socket
# and read by fio's nbd engine: warm 4 KiB random reads at QD32 and 1 MiB
# sequential reads. Then the heap one open export of a 10 GiB base costs.
# Prints: test, ours, anchor, ratio (goal >= 1.0).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${VMTHUNDER_BIN:-$PWD/bin/vmthunder}
RUNTIME=${BENCH_RUNTIME:-15}
SIZE_MB=${BENCH_SIZE_MB:-512}

for t in fio nbdkit nbdcopy python3; do
  command -v "$t" >/dev/null || { echo "bench-cache: $t is needed" >&2; exit 1; }
done
W=$(mktemp -d /tmp/vmthunder-bench-cache.XXXXXX)
SERVE=("$BIN" export)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  [ -n "${BENCH_KEEP:-}" ] || rm -rf "$W"
}
trap cleanup EXIT

head -c $((SIZE_MB << 20)) /dev/urandom >"$W/base.img"

wait_sock() {
  for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done
  echo "bench-cache: no socket $1" >&2; exit 1
}

"${SERVE[@]}" --socket "$W/ours.sock" --cache "$W/cache" --base bench --generation 1 --cow "$W/vm.cow" "$W/base.img" \
  >"$W/ours.log" 2>&1 &
PIDS+=($!)
nbdkit -f -U "$W/anchor.sock" file "$W/base.img" &
PIDS+=($!)
wait_sock "$W/ours.sock"
wait_sock "$W/anchor.sock"
nbdcopy "nbd+unix:///?socket=$W/ours.sock" null:     # warm the cache
nbdcopy "nbd+unix:///?socket=$W/anchor.sock" null:   # and the page cache

# fio_run SOCK RW BS QD -> prints IOPS and MiB/s
fio_run() {
  fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$1" --rw="$2" --bs="$3" \
    --iodepth="$4" --size="${SIZE_MB}M" --runtime="$RUNTIME" --time_based \
    --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; t=sys.stdin.read(); r=json.loads(t[t.index("{"):])["jobs"][0]["read"]; print(r["iops"], r["bw_bytes"]/1048576)'
}

row() { # name ours anchor unit
  python3 -c 'import sys; n,o,a,u=sys.argv[1:]; o=float(o); a=float(a); print(f"{n:<34} {o:>12.0f} {a:>12.0f} {o/a:>7.2f}x  ({u})")' "$@"
}

printf '%-34s %12s %12s %8s\n' test ours anchor ratio
read -r o_iops _ < <(fio_run "$W/ours.sock" randread 4k 32)
read -r a_iops _ < <(fio_run "$W/anchor.sock" randread 4k 32)
row "warm 4k randread QD32" "$o_iops" "$a_iops" IOPS
read -r _ o_bw < <(fio_run "$W/ours.sock" read 1m 4)
read -r _ a_bw < <(fio_run "$W/anchor.sock" read 1m 4)
row "warm 1M seq read QD4" "$o_bw" "$a_bw" MiB/s

mem=$(go test -count=1 -run '^TestMemoryPerExport$' ./sidecar/stack/ -v 2>&1 |
  awk '/^MEMORY_PER_EXPORT_BYTES/ {print $2}')
printf '%-34s %12s %12s %8s\n' "heap per export, 10 GiB base" "${mem:-?} B" "< 1048576 B" \
  "$([ -n "$mem" ] && python3 -c "print(f'{$mem/1048576:.4f}')")"
