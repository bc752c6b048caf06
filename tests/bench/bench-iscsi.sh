#!/usr/bin/env bash
# iSCSI origin benchmark: one private tgtd, a 1 GiB LUN in /dev/shm, queue
# depth 32, every figure from this run against the same LUN:
#   origin  - package iscsi read by qdread vs raw libiscsi (iscsi-perf)
#   copy    - qdread to the end of the LUN vs qemu-img convert iscsi://
#   export  - `vmthunder export iscsi://` read by fio's nbd engine vs
#             iscsi-perf, and vs qemu-nbd exporting the same iscsi:// URL
#             (the tool the export replaces), both read by the same fio job
#   daemon  - the same LUN attached through a `vmthunder daemon` as Nova
#             does (API create, mode cow, a base cache, the metrics layer),
#             COLD (a new daemon, empty cache) and WARM (cache filled by
#             `vmthunder warm` before the run), read by the same fio job.
#             COLD fills the 1 GiB LUN in about a second (256 KiB chunks),
#             so COLD 4K (4 KiB chunks) is there too: nearly every read a
#             miss, the cache's fill path end to end
# Read rows are medians of alternating runs (sequential 1 MiB: 3, random
# 4 KiB: 5; the whole-LUN copy runs once). Random rows come twice: with every
# process sharing all CPUs, and with tgtd alone on the last CPU (as on a
# storage node of its own; everything else on the others). When they
# share, the target and the NBD client take most of the CPU, so the CPU
# table shows where each 4 KiB read's time goes. About 10 minutes.
# For quicker runs while working: BENCH_KINDS (a subset of the random-row
# readers, e.g. "perf ours qemu-nbd daemon-warm"), BENCH_SPLIT=0 (no tgtd
# own-CPU rows), BENCH_SEQ=0 (no sequential or copy rows).
set -euo pipefail
cd "$(dirname "$0")/../.."
T=${BENCH_TIME:-4}
RUNS=${BENCH_RUNS:-5}
SEQ_RUNS=${BENCH_SEQ_RUNS:-3}
SIZE=${BENCH_SIZE:-1G}
DO_SEQ=${BENCH_SEQ:-1}
DO_SPLIT=${BENCH_SPLIT:-1}
# shellcheck disable=SC1091
. tests/bench/lib.sh
workdir iscsi

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

NCPU=$(nproc)
ON=() # command prefix: the CPUs for everything but tgtd
place() { # shared | split
  if [ "$1" = split ]; then
    taskset -a -p -c "$((NCPU - 1))" "$TGTD" >/dev/null
    ON=(taskset -c "0-$((NCPU - 2))")
  else
    taskset -a -p -c "0-$((NCPU - 1))" "$TGTD" >/dev/null
    ON=()
  fi
}
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
  out=$({ timeout -s INT "$T" "${ON[@]}" /usr/bin/time -f 'CPU %U %S' iscsi-perf -m 32 -b "$1" ${2:-} "$URL" 2>&1 || true; } | tr '\r' '\n')
  echo "$out" | awk -v bs="$1" -v t="$T" -v tg="$(($(ticks "$TGTD") - t0))" '
    /iops average/ { for (i = 1; i <= NF; i++) if ($i == "average") iops = $(i + 1) }
    /^CPU / { cpu = ($2 + $3) * 100 }
    END { printf "%.1f %d %d %d\n", iops * bs * 512 / 1048576, iops * t, cpu, tg }'
}

# fio's nbd engine against a socket. Prints "MiB/s ios client-ticks".
fiojob() { # socket rw bs [export-name]
  "${ON[@]}" fio --name=x --ioengine=nbd --uri="nbd+unix:///${4:-}?socket=$1" --size="$BYTES" --rw="$2" --bs="$3" \
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
    ours) "${ON[@]}" "$BIN" export --readonly --socket "$sock" "$URL" >"$WORK/$1.log" 2>&1 & pid=$! ;;
    ours-1p) GOMAXPROCS=1 "${ON[@]}" "$BIN" export --readonly --socket "$sock" "$URL" >"$WORK/$1.log" 2>&1 & pid=$! ;;
    qemu-nbd) "${ON[@]}" qemu-nbd --read-only --persistent --format=raw --socket="$sock" "$URL" >"$WORK/$1.log" 2>&1 & pid=$! ;;
  esac
  wait_sock "$sock" || { cat "$WORK/$1.log" >&2; kill "$pid"; return 1; }
  s0=$(ticks "$pid")
  t0=$(ticks "$TGTD")
  res=$(fiojob "$sock" "$2" "$3")
  echo "$res $(($(ticks "$pid") - s0)) $(($(ticks "$TGTD") - t0))" | awk '{print $1, $2, $4, $3, $5}'
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}

# daemon_run cold|cold4k|warm rw bs: a `vmthunder daemon` of its own (temp
# config, state and cache under WORK), the LUN attached through its API as
# Nova does (mode cow, template bench-lun generation 1), for one fio job;
# cold4k has 4 KiB chunks; warm fills the cache with `vmthunder warm`
# first. The daemon's CPU is counted over the fio job only. Prints "MiB/s
# ios server-ticks client-ticks target-ticks".
daemon_run() {
  local d="$WORK/daemon-$1" pid s0 t0 res base
  rm -rf "$d"
  mkdir -p "$d"
  printf '%s\n' "[DEFAULT]" "state_dir = $d/state" "api_socket = $d/api.sock" "nbd_socket_dir = $d/nbd" \
    "log_level = warning" "[cache]" "dir = $d/cache" "chunk_size = $([ "$1" = cold4k ] && echo 4K || echo 256K)" >"$d/vmthunder.conf"
  "${ON[@]}" "$BIN" daemon --config "$d/vmthunder.conf" >"$WORK/daemon-$1.log" 2>&1 &
  pid=$!
  wait_sock "$d/api.sock" || { cat "$WORK/daemon-$1.log" >&2; kill "$pid"; return 1; }
  if ! base=$(VMTHUNDER_SOCKET="$d/api.sock" "$BIN" attach --id vm1 --origin "$URL" --base bench-lun --generation 1 --mode cow --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["base"])') ||
    { [ "$1" = warm ] && ! VMTHUNDER_SOCKET="$d/api.sock" "$BIN" warm -q "$base" >/dev/null; } ||
    ! wait_sock "$d/nbd/vm1.sock"; then
    cat "$WORK/daemon-$1.log" >&2
    kill "$pid"
    return 1
  fi
  s0=$(ticks "$pid")
  t0=$(ticks "$TGTD")
  res=$(fiojob "$d/nbd/vm1.sock" "$2" "$3" vm1)
  echo "$res $(($(ticks "$pid") - s0)) $(($(ticks "$TGTD") - t0))" | awk '{print $1, $2, $4, $3, $5}'
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  rm -rf "$d"
}

# Sequential 1 MiB: medians of alternating runs (one run alone swung by a
# third between bench runs).
SEQ_P=() SEQ_O=() SEQ_E=() SEQ_Q=()
[ "$DO_SEQ" = 1 ] || SEQ_RUNS=0
for _ in $(seq "$SEQ_RUNS"); do
  read -r bw _ < <(perf 2048); SEQ_P+=("$bw")
  SEQ_O+=("$("$WORK/qdread" -qd 32 -bs 1048576 -time "${T}s" "$URL" | awk '{print $1}')")
  read -r bw _ < <(export_run ours read 1M); SEQ_E+=("$bw")
  read -r bw _ < <(export_run qemu-nbd read 1M); SEQ_Q+=("$bw")
done
if [ "$DO_SEQ" = 1 ]; then
  P_SEQ=$(median "${SEQ_P[@]}") O_SEQ=$(median "${SEQ_O[@]}")
  E_SEQ=$(median "${SEQ_E[@]}") Q_SEQ=$(median "${SEQ_Q[@]}")
fi

# Random 4 KiB: alternating runs, medians, in both placements.
read -r -a KINDS <<<"${BENCH_KINDS:-perf origin ours ours-1p qemu-nbd daemon-cold daemon-cold4k daemon-warm}"
declare -A BW IOS SRV CLI TGT
random_runs() { # placement
  local k bw ios srv cli tg t0
  place "$1"
  for _ in $(seq "$RUNS"); do
    for k in "${KINDS[@]}"; do
      case $k in
        perf) read -r bw ios srv tg < <(perf 8 -r); cli=0 ;;
        origin)
          t0=$(ticks "$TGTD")
          read -r bw ios srv < <("${ON[@]}" /usr/bin/time -f '%U %S' "$WORK/qdread" -qd 32 -bs 4096 -random -time "${T}s" "$URL" 2>&1 |
            awk -v t="$T" '/MiB\/s/ { bw = $1; ios = $3 * t } NF == 2 && $1 ~ /^[0-9.]+$/ { cpu = ($1 + $2) * 100 } END { printf "%s %d %d\n", bw, ios, cpu }')
          tg=$(($(ticks "$TGTD") - t0)); cli=0 ;;
        daemon-*) read -r bw ios srv cli tg < <(daemon_run "${k#daemon-}" randread 4k) ;;
        *) read -r bw ios srv cli tg < <(export_run "$k" randread 4k) ;;
      esac
      BW[$1.$k]+="$bw "; IOS[$1.$k]+="$ios "; SRV[$1.$k]+="$srv "; CLI[$1.$k]+="$cli "; TGT[$1.$k]+="$tg "
    done
  done
  place shared
}
random_runs shared
SPLIT=no
if [ "$NCPU" -ge 2 ] && [ "$DO_SPLIT" = 1 ]; then
  random_runs split
  SPLIT=yes
fi
# R placement.kind: the median MiB/s, or "" when that reader did not run.
# shellcheck disable=SC2086
R() { if [ -n "${BW[$1]:-}" ]; then median ${BW[$1]}; fi; }
# rrow NAME OURS ANCHOR NOTE: a row when both figures were measured.
rrow() { if [ -n "$2" ] && [ -n "$3" ]; then row "$@"; fi; }

if [ "$DO_SEQ" = 1 ]; then
  row "seq read 1MiB QD32 origin (MiB/s)" "$O_SEQ" "$P_SEQ" "vs iscsi-perf"
fi
rrow "rand read 4KiB QD32 origin (MiB/s)" "$(R shared.origin)" "$(R shared.perf)" "vs iscsi-perf"

if [ "$DO_SEQ" = 1 ]; then
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
fi
rrow "rand read 4KiB QD32 export (MiB/s)" "$(R shared.ours)" "$(R shared.perf)" "vs iscsi-perf"
rrow "rand read 4KiB QD32 export (MiB/s)" "$(R shared.ours)" "$(R shared.qemu-nbd)" "vs qemu-nbd export"
rrow "rand read 4KiB QD32 export GOMAXPROCS=1" "$(R shared.ours-1p)" "$(R shared.perf)" "vs iscsi-perf"
for c in cold cold4k warm; do
  rrow "rand read 4KiB QD32 daemon $c (MiB/s)" "$(R shared.daemon-$c)" "$(R shared.perf)" "vs iscsi-perf"
  rrow "rand read 4KiB QD32 daemon $c (MiB/s)" "$(R shared.daemon-$c)" "$(R shared.qemu-nbd)" "vs qemu-nbd export"
  rrow "rand read 4KiB QD32 daemon $c (MiB/s)" "$(R shared.daemon-$c)" "$(R shared.ours)" "vs vmthunder export"
done
if [ "$SPLIT" = yes ]; then
  rrow "tgtd own CPU: rand 4KiB origin (MiB/s)" "$(R split.origin)" "$(R split.perf)" "vs iscsi-perf"
  rrow "tgtd own CPU: rand 4KiB export (MiB/s)" "$(R split.ours)" "$(R split.perf)" "vs iscsi-perf"
  rrow "tgtd own CPU: rand 4KiB export (MiB/s)" "$(R split.ours)" "$(R split.qemu-nbd)" "vs qemu-nbd export"
  rrow "tgtd own CPU: rand 4KiB export 1 proc" "$(R split.ours-1p)" "$(R split.perf)" "vs iscsi-perf"
  for c in cold cold4k warm; do
    rrow "tgtd own CPU: rand 4KiB daemon $c" "$(R split.daemon-$c)" "$(R split.perf)" "vs iscsi-perf"
    rrow "tgtd own CPU: rand 4KiB daemon $c" "$(R split.daemon-$c)" "$(R split.qemu-nbd)" "vs qemu-nbd export"
  done
fi

for k in "${KINDS[@]}"; do
  # shellcheck disable=SC2086
  cpurow "$k" "$(median ${IOS[shared.$k]})" "$(median ${SRV[shared.$k]})" "$(median ${CLI[shared.$k]})" "$(median ${TGT[shared.$k]})"
done

printf '%-44s %10s %10s %6s\n' "test" "ours" "anchor" "ratio"
printf '%s\n' "${ROWS[@]}"
echo "random rows: median of $RUNS alternating runs of ${T}s, sequential rows of $SEQ_RUNS; anchors: iscsi-perf (raw libiscsi), qemu-img convert, qemu-nbd"
echo "\"tgtd own CPU\": tgtd pinned to CPU $((NCPU - 1)), every other process to the rest; goal ratio >= 0.80 vs iscsi-perf"
echo "daemon: the LUN attached through \`vmthunder daemon\` (mode cow, 256 KiB chunks, metrics layer); cold: a new daemon, empty cache; cold4k: the same with 4 KiB chunks; warm: cache filled first"
echo "daemon goal: >= 1.2x qemu-nbd and >= 0.8x iscsi-perf, sidecar CPU <= 12 us per read (CPU table, initiator column)"
echo
echo "CPU per 4 KiB random read (us), medians, all parties sharing the machine's $NCPU CPUs:"
printf '%-30s %10s %10s %10s %10s\n' "reader" "initiator" "NBD client" "tgtd" "total"
printf '%s\n' "${CPU[@]}"
echo "(initiator: iscsi-perf, qdread, or the NBD server process; NBD client: fio's nbd engine)"
echo
echo "random 4 KiB runs (MiB/s), in order:"
for p in shared split; do
  for k in "${KINDS[@]}"; do
    if [ -n "${BW[$p.$k]:-}" ]; then printf '  %-16s %s\n' "$p.$k" "${BW[$p.$k]}"; fi
  done
done
