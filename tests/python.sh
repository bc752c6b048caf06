#!/usr/bin/env bash
# Python shims: installed with pip (not editable: the Nova plugin puts a
# package into nova's own nova/virt directory), then tested with pytest
# against real os-brick, nova, tgtd, libvirtd and the sidecar.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q --no-deps --force-reinstall ./cinder-connector ./nova-plugin
rm -rf cinder-connector/build nova-plugin/build ./*/*.egg-info
"$PY" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning cinder-connector/tests nova-plugin/tests
