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
  iproute2 prometheus procps psmisc util-linux sudo curl passwd \
  python3 python3-venv python3-dev rabbitmq-server mariadb-server

# libvirt runs QEMU as libvirt-qemu; it has to be able to reach sockets in
# the group the daemon hands them to.
getent group libvirt-qemu >/dev/null || true

# The Debian packages start a system RabbitMQ and MariaDB where they can; the
# tests run their own private instances (tests/openstack) and need neither.

# Python packages (pytest, ruff, Nova, Cinder, Glance, Placement, os-brick,
# libvirt-python built against libvirt-dev) go into the venv `make venv`
# creates from Debian's python3 with requirements-lock.txt; `make test` runs it.

echo "install-deps: done"
