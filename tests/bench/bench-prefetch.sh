#!/usr/bin/env bash
# Boot-trace prefetch: a real QEMU guest's cold boot through the daemon with
# the origin capped by tc (25 and 100 Mbit/s, 1 ms delay, in a network
# namespace), without a trace and with one, against the larger of a warm
# boot and the transfer limit (working set / bandwidth). Needs root
# (ip netns, tc, tgtd, libvirtd). BENCH_PREFETCH_ROUNDS (3), BENCH_PREFETCH_MBIT
# ("25,100") for quicker runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec go run ./tests/e2e/benchprefetch -rounds "${BENCH_PREFETCH_ROUNDS:-3}" -mbit "${BENCH_PREFETCH_MBIT:-25,100}" "$@"
