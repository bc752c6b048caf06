# Helpers shared by the bench-*.sh sections (sourced).

# workdir NAME: a scratch directory WORK in /dev/shm. On exit every pid
# added to PIDS is killed and WORK is removed.
workdir() {
  WORK=$(mktemp -d "/dev/shm/vmthunder-bench-$1.XXXXXX")
  PIDS=()
  trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT
}

# fio_nbd URI RW BS QD SECONDS -> prints "IOPS MiB/s"
fio_nbd() {
  local uri=$1 rw=$2 bs=$3 qd=$4 secs=${5:-8}
  fio --name=b --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" \
      --runtime="$secs" --time_based --ramp_time=1 --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]["read"]; print("%.0f %.1f" % (j["iops"], j["bw_bytes"]/1048576))'
}

# wait_sock PATH: wait until a unix socket exists (10 s).
wait_sock() {
  for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.1; done
  echo "bench: socket $1 never appeared" >&2; return 1
}

# row NAME OURS ANCHOR UNIT: one table line with the ratio ours/anchor.
row() {
  python3 -c 'import sys; n,o,a,u=sys.argv[1:]; o=float(o); a=float(a); print("%-34s %12.1f %12.1f %-6s %6.2fx" % (n,o,a,u,(o/a if a else 0)))' "$@"
}

header() {
  printf '%-34s %12s %12s %-6s %7s\n' "test" "ours" "$1" "unit" "ratio"
}
