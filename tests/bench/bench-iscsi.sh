#!/usr/bin/env bash
# iSCSI origin benchmark: one private tgtd, a 1 GiB LUN in /dev/shm, and
# side by side at queue depth 32:
#   ours   - the iscsi origin (sidecar/origin/iscsi) read by qdread, and
#            `vmthunder export iscsi://...` read by fio's nbd engine (cold)
#   anchor - raw libiscsi (iscsi-perf) and qemu-img convert of iscsi://
# Prints: test, ours, anchor, ratio. About 1.5 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
T=${BENCH_TIME:-8}
SIZE=${BENCH_SIZE:-1G}
WORK=$(mktemp -d /dev/shm/vmthunder-bench-iscsi.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

go build -o "$WORK/tgtup" ./sidecar/internal/tgt/tgtup
go build -o "$WORK/qdread" ./sidecar/origin/iscsi/internal/qdread

"$WORK/tgtup" -size "$SIZE" -dir "$WORK" >"$WORK/tgt.env" 2>"$WORK/tgtup.err" &
PIDS+=($!)
for _ in $(seq 100); do grep -q TGT_READY "$WORK/tgt.env" 2>/dev/null && break; sleep 0.2; done
grep -q TGT_READY "$WORK/tgt.env" || { echo "tgtd did not start:"; cat "$WORK/tgtup.err"; exit 1; }
# shellcheck disable=SC1091
. "$WORK/tgt.env"
URL=$TGT_URL

# iscsi-perf runs until SIGINT; its last status line has the average.
perf() { # blocks-per-request [-r] -> MiB/s
  { timeout -s INT "$T" iscsi-perf -m 32 -b "$1" ${2:-} "$URL" 2>&1 || true; } | tr '\r' '\n' |
    sed -n 's/.*iops average \([0-9]*\) .*/\1/p' | tail -1 |
    awk -v bs="$1" '{ printf "%.1f", $1 * bs * 512 / 1048576 }'
}
qd() { "$WORK/qdread" -qd 32 -time "${T}s" "$@" "$URL" | awk '{print $1}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
ROWS=()
row() { ROWS+=("$(printf '%-40s %12s %12s %7s' "$1" "$2" "$3" "$(ratio "$2" "$3")")"); }

# Raw libiscsi first, then ours, each against the same LUN (tgtd serves it
# from /dev/shm, so "cold" here means cold in the sidecar, not in tgtd).
P_SEQ=$(perf 2048)
P_RND=$(perf 8 -r)
O_SEQ=$(qd -bs 1048576)
O_RND=$(qd -bs 4096 -random)
row "seq read 1MiB QD32 origin (MiB/s)" "$O_SEQ" "$P_SEQ"
row "rand read 4KiB QD32 origin (MiB/s)" "$O_RND" "$P_RND"

# Whole-LUN copy: qdread to the end vs qemu-img convert (16 coroutines,
# out of order) into a null device.
BYTES=$(stat -c %s "$TGT_FILE")
t0=$(date +%s.%N)
"$WORK/qdread" -qd 16 -bs 2097152 -time 600s "$URL" >/dev/null
t1=$(date +%s.%N)
qemu-img convert -n -W -m 16 -f raw "$URL" --target-image-opts "driver=null-co,size=$BYTES"
t2=$(date +%s.%N)
O_CP=$(awk -v b="$BYTES" -v a="$t0" -v z="$t1" 'BEGIN { printf "%.1f", b / (z - a) / 1048576 }')
Q_CP=$(awk -v b="$BYTES" -v a="$t1" -v z="$t2" 'BEGIN { printf "%.1f", b / (z - a) / 1048576 }')
row "copy whole LUN origin vs qemu-img (MiB/s)" "$O_CP" "$Q_CP"

# Through the NBD export, when `vmthunder export` exists (another issue).
if [ -n "${VMTHUNDER_BIN:-}" ] && { "$VMTHUNDER_BIN" export --help 2>&1 || true; } | grep -q -- --socket; then
  SOCK="$WORK/nbd.sock"
  "$VMTHUNDER_BIN" export --socket "$SOCK" "$URL" >"$WORK/export.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
  if [ -S "$SOCK" ]; then
    fiojob() { # rw bs -> MiB/s
      fio --name=x --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" --size="$BYTES" --rw="$1" --bs="$2" \
        --iodepth=32 --time_based --runtime="$T" --output-format=json 2>/dev/null |
        python3 -c 'import json,sys; s=sys.stdin.read(); j=json.loads(s[s.index("{"):]); print("%.1f" % (j["jobs"][0]["read"]["bw"]/1024))'
    }
    E_SEQ=$(fiojob read 1M)
    E_RND=$(fiojob randread 4k)
    row "seq read 1MiB QD32 export (MiB/s)" "$E_SEQ" "$P_SEQ"
    row "rand read 4KiB QD32 export (MiB/s)" "$E_RND" "$P_RND"
  else
    ROWS+=("export: socket did not appear; see $WORK/export.log")
    cat "$WORK/export.log"
  fi
else
  ROWS+=("export rows: skipped, \$VMTHUNDER_BIN has no 'export' subcommand yet")
fi

printf '%-40s %12s %12s %7s\n' "test" "ours" "anchor" "ratio"
printf '%s\n' "${ROWS[@]}"
echo "anchors: iscsi-perf (raw libiscsi, QD32) and qemu-img convert iscsi://; goal ratio >= 0.80"
