#!/usr/bin/env bash
# Installs every system package and tool VMThunder's build, tests, benchmarks
# and demo need. Idempotent: safe to run again on a machine that has them.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: must run as root (it calls apt-get)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
  build-essential pkg-config git ca-certificates \
  tgt libiscsi-dev libiscsi-bin \
  libvirt-dev libvirt-daemon-system libvirt-clients \
  qemu-system-x86 qemu-utils qemu-block-extra \
  nbdkit libnbd-bin python3-libnbd fio \
  busybox-static linux-image-amd64 e2fsprogs cpio \
  iproute2 prometheus procps psmisc util-linux sudo curl passwd

# libvirt runs QEMU as libvirt-qemu; it has to be able to reach sockets in
# the group the daemon hands them to.
getent group libvirt-qemu >/dev/null || true

# Python packages (pytest, ruff, the real os-brick and nova the shims are
# tested against) are installed by `make python-deps`, which `make test`
# runs as you, into the Python the tests use.

echo "install-deps: done"
