#!/usr/bin/env bash
# Boot time of a guest from a warm sidecar export against the same guest
# booting from a local raw file (QEMU reads it itself), measured in one run;
# plus a cold boot through the sidecar against QEMU's own iSCSI driver.
# Prints: test, ours, anchor, ratio. Needs root (tgtd, libvirtd).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec go run ./tests/e2e/benchboot "$@"
