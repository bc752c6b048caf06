#!/usr/bin/env bash
# make demo: the main job on an embedded default. Boots N guests (default 4,
# VMTHUNDER_DEMO_VMS or -n) from one base through the sidecar and, in the
# same run, straight from the iSCSI target; prints a table per guest and
# writes demo-report.json. Needs root (tgtd, libvirtd).
#
# --openstack: the same job through OpenStack's compute API (Nova's own
# services with the VMThunder driver, a real Cinder holding the template;
# tests/demo/nova_wave.py), baseline = stock Nova's image cache. Needs the
# venv (make venv); PYTHON overrides it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--openstack" ]; then
	shift
	exec "${PYTHON:-.venv/bin/python}" tests/demo/nova_wave.py "$@"
fi
exec go run ./tests/demo "$@"
