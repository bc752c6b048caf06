#!/usr/bin/env bash
# iSCSI origin benchmark: one private tgtd, a 1 GiB LUN in /dev/shm, queue
# depth 32, every figure from this run against the same LUN:
#   origin  - package iscsi read by qdread vs raw libiscsi (iscsi-perf)
#   copy    - qdread to the end of the LUN vs qemu-img convert iscsi://
#   export  - `vmthunder export iscsi://` read by fio's nbd engine vs
#             iscsi-perf, and vs qemu-nbd exporting the same iscsi:// URL
#             (the tool the export replaces), both read by the same fio job
# Random 4 KiB rows are medians of alternating runs. On one machine the
# target, the initiator and (for exports) the NBD client share the CPUs,
# so the last table shows where each 4 KiB read's CPU time goes.
# About 4 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
T=${BENCH_TIME:-8}
RUNS=${BENCH_RUNS:-3}
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
BIN=${VMTHUNDER_BIN:-}
if [ -z "$BIN" ]; then
  go build -o "$WORK/vmthunder" ./sidecar/cmd/vmthunder
  BIN=$WORK/vmthunder
fi

"$WORK/tgtup" -size "$SIZE" -dir "$WORK" >"$WORK/tgt.env" 2>"$WORK/tgtup.err" &
TGTUP=$!
PIDS+=($TGTUP)
for _ in $(seq 100); do grep -q TGT_READY "$WORK/tgt.env" 2>/dev/null && break; sleep 0.2; done
grep -q TGT_READY "$WORK/tgt.env" || { echo "tgtd did not start:"; cat "$WORK/tgtup.err"; exit 1; }
# shellcheck disable=SC1091
. "$WORK/tgt.env"
URL=$TGT_URL
BYTES=$(stat -c %s "$TGT_FILE")
TGTD=$(pgrep -P "$TGTUP" -x tgtd | head -1)

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; } # user+system, 1/100 s
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
ROWS=()
row() { ROWS+=("$(printf '%-44s %10s %10s %6s   %s' "$1" "$2" "$3" "$(ratio "$2" "$3")" "$4")"); }
CPU=()
cpurow() { # name ios ticks-initiator ticks-client ticks-target -> µs per read
  CPU+=("$(awk -v n="$1" -v io="$2" -v i="$3" -v c="$4" -v t="$5" 'BEGIN {
    f = 10000 / (io > 0 ? io : 1)
    printf "%-30s %10.1f %10.1f %10.1f %10.1f", n, i * f, c * f, t * f, (i + c + t) * f }')")
}

# iscsi-perf runs until SIGINT; its last status line has the average IOPS.
# Prints "MiB/s ios initiator-ticks target-ticks".
perf() { # blocks-per-request [-r]
  local t0 out
  t0=$(ticks "$TGTD")
  out=$({ timeout -s INT "$T" /usr/bin/time -f 'CPU %U %S' iscsi-perf -m 32 -b "$1" ${2:-} "$URL" 2>&1 || true; } | tr '\r' '\n')
  echo "$out" | awk -v bs="$1" -v t="$T" -v tg="$(($(ticks "$TGTD") - t0))" '
    /iops average/ { for (i = 1; i <= NF; i++) if ($i == "average") iops = $(i + 1) }
    /^CPU / { cpu = ($2 + $3) * 100 }
    END { printf "%.1f %d %d %d\n", iops * bs * 512 / 1048576, iops * t, cpu, tg }'
}

# fio's nbd engine against a socket. Prints "MiB/s ios client-ticks".
fiojob() { # socket rw bs
  fio --name=x --ioengine=nbd --uri="nbd+unix:///?socket=$1" --size="$BYTES" --rw="$2" --bs="$3" \
    --iodepth=32 --time_based --runtime="$T" --output-format=json 2>/dev/null |
    python3 -c 'import json,sys
s=sys.stdin.read(); j=json.loads(s[s.index("{"):])["jobs"][0]
print("%.1f %d %d" % (j["read"]["bw"]/1024, j["read"]["total_ios"], round((j["usr_cpu"]+j["sys_cpu"])*j["job_runtime"]/1000)))'
}

# export KIND rw bs: serve the LUN with KIND (ours, ours-1p, qemu-nbd) for
# one fio job. Prints "MiB/s ios server-ticks client-ticks target-ticks".
export_run() {
  local sock="$WORK/$1.sock" pid s0 t0 res
  rm -f "$sock"
  case $1 in
    ours) "$BIN" export --readonly --socket "$sock" "$URL" >"$WORK/$1.log" 2>&1 & pid=$! ;;
    ours-1p) GOMAXPROCS=1 "$BIN" export --readonly --socket "$sock" "$URL" >"$WORK/$1.log" 2>&1 & pid=$! ;;
    qemu-nbd) qemu-nbd --read-only --persistent --format=raw --socket="$sock" "$URL" >"$WORK/$1.log" 2>&1 & pid=$! ;;
  esac
  for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
  [ -S "$sock" ] || { echo "$1: socket did not appear:" >&2; cat "$WORK/$1.log" >&2; kill "$pid"; return 1; }
  s0=$(ticks "$pid")
  t0=$(ticks "$TGTD")
  res=$(fiojob "$sock" "$2" "$3")
  echo "$res $(($(ticks "$pid") - s0)) $(($(ticks "$TGTD") - t0))" | awk '{print $1, $2, $4, $3, $5}'
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}

# Sequential 1 MiB: one run each.
read -r P_SEQ _ < <(perf 2048)
O_SEQ=$("$WORK/qdread" -qd 32 -bs 1048576 -time "${T}s" "$URL" | awk '{print $1}')
read -r E_SEQ _ < <(export_run ours read 1M)
read -r Q_SEQ _ < <(export_run qemu-nbd read 1M)

# Random 4 KiB: alternating runs, medians.
declare -A BW IOS SRV CLI TGT
KINDS=(perf origin ours ours-1p qemu-nbd)
for _ in $(seq "$RUNS"); do
  for k in "${KINDS[@]}"; do
    case $k in
      perf) read -r bw ios srv tg < <(perf 8 -r); cli=0 ;;
      origin)
        t0=$(ticks "$TGTD")
        read -r bw ios srv < <(/usr/bin/time -f '%U %S' "$WORK/qdread" -qd 32 -bs 4096 -random -time "${T}s" "$URL" 2>&1 |
          awk -v t="$T" '/MiB\/s/ { bw = $1; ios = $3 * t } NF == 2 && $1 ~ /^[0-9.]+$/ { cpu = ($1 + $2) * 100 } END { printf "%s %d %d\n", bw, ios, cpu }')
        tg=$(($(ticks "$TGTD") - t0)); cli=0 ;;
      *) read -r bw ios srv cli tg < <(export_run "$k" randread 4k) ;;
    esac
    BW[$k]+="$bw "; IOS[$k]+="$ios "; SRV[$k]+="$srv "; CLI[$k]+="$cli "; TGT[$k]+="$tg "
  done
done
# shellcheck disable=SC2086
med() { median ${1} ; }
for k in "${KINDS[@]}"; do
  declare "R_${k//-/_}=$(med "${BW[$k]}")"
done

row "seq read 1MiB QD32 origin (MiB/s)" "$O_SEQ" "$P_SEQ" "vs iscsi-perf"
row "rand read 4KiB QD32 origin (MiB/s)" "$R_origin" "$R_perf" "vs iscsi-perf"

# Whole-LUN copy: qdread to the end vs qemu-img convert (16 coroutines,
# out of order) into a null device.
t0=$(date +%s.%N)
"$WORK/qdread" -qd 16 -bs 2097152 -time 600s "$URL" >/dev/null
t1=$(date +%s.%N)
qemu-img convert -n -W -m 16 -f raw "$URL" --target-image-opts "driver=null-co,size=$BYTES"
t2=$(date +%s.%N)
O_CP=$(awk -v b="$BYTES" -v a="$t0" -v z="$t1" 'BEGIN { printf "%.1f", b / (z - a) / 1048576 }')
Q_CP=$(awk -v b="$BYTES" -v a="$t1" -v z="$t2" 'BEGIN { printf "%.1f", b / (z - a) / 1048576 }')
row "copy whole LUN origin (MiB/s)" "$O_CP" "$Q_CP" "vs qemu-img convert"

row "seq read 1MiB QD32 export (MiB/s)" "$E_SEQ" "$P_SEQ" "vs iscsi-perf"
row "seq read 1MiB QD32 export (MiB/s)" "$E_SEQ" "$Q_SEQ" "vs qemu-nbd export"
row "rand read 4KiB QD32 export (MiB/s)" "$R_ours" "$R_perf" "vs iscsi-perf"
row "rand read 4KiB QD32 export (MiB/s)" "$R_ours" "$R_qemu_nbd" "vs qemu-nbd export"
row "rand read 4KiB QD32 export GOMAXPROCS=1" "$R_ours_1p" "$R_perf" "vs iscsi-perf"

for k in "${KINDS[@]}"; do
  # shellcheck disable=SC2086
  cpurow "$k" "$(median ${IOS[$k]})" "$(median ${SRV[$k]})" "$(median ${CLI[$k]})" "$(median ${TGT[$k]})"
done

printf '%-44s %10s %10s %6s\n' "test" "ours" "anchor" "ratio"
printf '%s\n' "${ROWS[@]}"
echo "random rows: median of $RUNS alternating runs of ${T}s; anchors: iscsi-perf (raw libiscsi), qemu-img convert, qemu-nbd"
echo
echo "CPU per 4 KiB random read (us), medians; all parties share this machine's $(nproc) CPUs:"
printf '%-30s %10s %10s %10s %10s\n' "reader" "initiator" "NBD client" "tgtd" "total"
printf '%s\n' "${CPU[@]}"
echo "(initiator: iscsi-perf, qdread, or the NBD server process; NBD client: fio's nbd engine)"
