#!/usr/bin/env bash
# make demo: the main job on an embedded default. Boots N guests (default 4,
# VMTHUNDER_DEMO_VMS or -n) from one base through the sidecar and, in the
# same run, straight from the iSCSI target; prints a table per guest and
# writes demo-report.json. Needs root (tgtd, libvirtd).
set -euo pipefail
cd "$(dirname "$0")/.."
exec go run ./tests/demo "$@"
