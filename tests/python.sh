#!/usr/bin/env bash
# Python tests: the shims, installed with pip (not editable) and tested as
# installed against real os-brick, nova, tgtd, libvirtd and the sidecar
# ($VMTHUNDER_BIN, else bin/vmthunder); and the test control plane
# (tests/openstack: real RabbitMQ, tgtd, Glance and Cinder).
set -euo pipefail
cd "$(dirname "$0")/.."
# The venv `make venv` creates (OpenStack services, shims' dependencies, pytest).
PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ] && [ -z "${PYTHON:-}" ]; then make venv; fi
"$PY" -m pip install -q --no-deps --no-build-isolation --force-reinstall ./cinder-connector ./nova-plugin
rm -rf cinder-connector/build nova-plugin/build ./*/*.egg-info
# The installed packages are tested, not the source trees: run from the
# repository root, where neither package directory is importable.
"$PY" -c 'import nova.virt.vmthunder, vmthunder_brick' >/dev/null
"$PY" -m pytest -q -p no:cacheprovider --rootdir "$PWD" --timeout 300 \
    -W ignore::DeprecationWarning cinder-connector/tests nova-plugin/tests tests/openstack
# Nova's own services (in-process API, conductor, scheduler, placement)
# booting servers through the driver: run the way Nova's functional tests
# are (testtools), not under pytest (nova-plugin/tests/functional/README.md).
"$PY" -m testtools.run discover -s nova-plugin/tests/functional -t nova-plugin/tests/functional
