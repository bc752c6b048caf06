#!/usr/bin/env bash
# Bulk boot: N simulated compute nodes (network namespaces, tc tbf caps,
# one vmthunder daemon each) boot one template at once — direct iSCSI (the
# baseline), the sidecar, the sidecar with peers — printed side by side
# with the origin's bytes over one boot's working set and boot p50/p99/max
# (docs/bench-bulk.md). Needs root (ip netns, tc, tgtd, libvirtd, QEMU).
# NODES (1,8,32; e.g. NODES=100), BULK_THINK (1,0), BULK_QEMU (3),
# BULK_REPORT (bench-bulk-report.json), BULK_ORIGIN_MBIT (200),
# BULK_NODE_MBIT (1000), BULK_DELAY_MS (1).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec go run ./tests/bulk/cmd/bulkbench "$@"
