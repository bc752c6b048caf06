#!/bin/bash
# devstack plugin for VMThunder: builds the sidecar and runs it as a systemd
# unit, installs the os-brick connector and the Nova driver, points Nova at
# the sidecar. Enable with `enable_plugin vmthunder <repo>` in local.conf.

function install_vmthunder {
    # The runtime subset of scripts/install-deps.sh: the userspace iSCSI
    # initiator (cgo, pkg-config libiscsi) and QEMU's NBD client; libvirt
    # and QEMU themselves come with devstack's nova.
    install_package build-essential pkg-config libiscsi-dev qemu-utils
    # go.mod names the Go release the sidecar needs; devstack has none.
    if ! "$VMTHUNDER_GO" version >/dev/null 2>&1; then
        die $LINENO "vmthunder: set VMTHUNDER_GO to a Go toolchain (see go.mod)"
    fi
    make -C "$VMTHUNDER_DIR" build GO="$VMTHUNDER_GO"
    sudo install -m 0755 "$VMTHUNDER_DIR/bin/vmthunder" /usr/local/bin/vmthunder
    # Not editable: the Nova plugin installs nova/virt/vmthunder into nova.
    pip_install "$VMTHUNDER_DIR/cinder-connector" "$VMTHUNDER_DIR/nova-plugin"
}

function configure_vmthunder {
    sudo install -d -m 0755 "$VMTHUNDER_CONF_DIR"
    sudo tee "$VMTHUNDER_CONF_DIR/vmthunder.conf" >/dev/null <<CONF
[DEFAULT]
state_dir = $VMTHUNDER_STATE_DIR
api_socket = $VMTHUNDER_API_SOCKET
nbd_socket_dir = $VMTHUNDER_NBD_SOCKET_DIR
api_group = $VMTHUNDER_API_GROUP
nbd_group = $VMTHUNDER_NBD_GROUP
allowed_origin_dirs = $VMTHUNDER_ALLOWED_ORIGIN_DIRS
allowed_origin_devices = $VMTHUNDER_ALLOWED_ORIGIN_DEVICES
allowed_cow_dirs = $VMTHUNDER_STATE_DIR/cow

[cache]
dir = $VMTHUNDER_STATE_DIR/cache
size_budget = $VMTHUNDER_CACHE_BUDGET

[metrics]
listen = $VMTHUNDER_METRICS_LISTEN
CONF
    # The unit runs /usr/local/bin/vmthunder with /etc/vmthunder/vmthunder.conf;
    # point it at this config if VMTHUNDER_CONF_DIR moved it.
    sudo install -m 0644 "$VMTHUNDER_DIR/contrib/systemd/vmthunder.service" \
        /etc/systemd/system/vmthunder.service
    sudo sed -i "s|--config [^ ]*|--config $VMTHUNDER_CONF_DIR/vmthunder.conf|" \
        /etc/systemd/system/vmthunder.service
    sudo systemctl daemon-reload

    # nova-compute loads nova.virt.vmthunder.VMThunderDriver; its [vmthunder]
    # section also tells the os-brick connector where the sidecar listens.
    iniset "$NOVA_CPU_CONF" DEFAULT compute_driver vmthunder.VMThunderDriver
    iniset "$NOVA_CPU_CONF" vmthunder enabled True
    iniset "$NOVA_CPU_CONF" vmthunder api_socket "$VMTHUNDER_API_SOCKET"
    iniset "$NOVA_CPU_CONF" vmthunder reconnect_delay "$VMTHUNDER_RECONNECT_DELAY"
}

function start_vmthunder {
    sudo systemctl enable --now vmthunder.service
}

function stop_vmthunder {
    sudo systemctl stop vmthunder.service || true
}

if is_service_enabled vmthunder; then
    if [[ "$1" == "stack" && "$2" == "install" ]]; then
        install_vmthunder
    elif [[ "$1" == "stack" && "$2" == "post-config" ]]; then
        configure_vmthunder
        # The sidecar must be up before nova-compute attaches anything.
        start_vmthunder
    fi
    if [[ "$1" == "unstack" ]]; then
        stop_vmthunder
    fi
    if [[ "$1" == "clean" ]]; then
        sudo rm -f /etc/systemd/system/vmthunder.service /usr/local/bin/vmthunder
    fi
fi
