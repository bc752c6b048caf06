#!/usr/bin/env bash
# NBD server vs `nbdkit file` on the same 1 GiB file in /dev/shm, same run,
# with fio's nbd engine: 4k random read QD32, 1 MiB sequential read QD4,
# and 4k random read QD32 with 1 ms read latency on both sides (our delay
# layer vs nbdkit's delay filter). Each figure is the median of ROUNDS
# short runs taken alternately on both servers, so load from anything else
# on the machine hits both alike.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
BIN=${VMTHUNDER_BIN:-$here/../../bin/vmthunder}
ROUNDS=${ROUNDS:-3}
SECS=${SECS:-4}
[ -x "$BIN" ] || { echo "bench-nbd: $BIN is not built (make build)" >&2; exit 1; }
for tool in fio nbdkit; do
  command -v "$tool" >/dev/null || { echo "bench-nbd: $tool is not installed" >&2; exit 1; }
done

workdir nbd
dir=$WORK
img=$dir/disk.img
dd if=/dev/urandom of="$img" bs=1M count=1024 status=none

serve() { # NAME [DELAY]
  local sock=$dir/$1.sock delay=${2:-}
  case $1 in
    ours*) "$BIN" export --readonly --socket "$sock" ${delay:+--delay-read "$delay"} "$img" 2>"$dir/$1.log" & ;;
    nbdkit*) nbdkit -f -r -U "$sock" ${delay:+--filter=delay} file "$img" ${delay:+rdelay=$delay} 2>"$dir/$1.log" & ;;
  esac
  PIDS+=($!)
  wait_sock "$sock"
}
serve ours; serve nbdkit; serve ours-delay 1ms; serve nbdkit-delay 1ms
u() { echo "nbd+unix:///?socket=$dir/$1.sock"; }

median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }

# compare NAME UNIT FIELD RW BS QD OURS NBDKIT: FIELD 1 is IOPS, 2 is MiB/s.
compare() {
  local name=$1 unit=$2 field=$3 rw=$4 bs=$5 qd=$6 a=() b=()
  for _ in $(seq "$ROUNDS"); do
    a+=("$(fio_nbd "$(u "$7")" "$rw" "$bs" "$qd" "$SECS" | cut -d' ' -f"$field")")
    b+=("$(fio_nbd "$(u "$8")" "$rw" "$bs" "$qd" "$SECS" | cut -d' ' -f"$field")")
  done
  row "$name" "$(median "${a[@]}")" "$(median "${b[@]}")" "$unit"
  runs+=("  $name: ours ${a[*]} | nbdkit ${b[*]}")
}
runs=()

header nbdkit
compare "4k randread QD32" IOPS 1 randread 4k 32 ours nbdkit
compare "1M seqread QD4" MiB/s 2 read 1M 4 ours nbdkit
compare "4k randread QD32 +1ms read delay" IOPS 1 randread 4k 32 ours-delay nbdkit-delay
echo "(medians of $ROUNDS alternating ${SECS}s runs; every run:)"
printf '%s\n' "${runs[@]}"
