#!/bin/bash
# devstack plugin for VMThunder: builds and starts the sidecar as a systemd
# unit, installs the os-brick connector and the Nova driver, points Nova at it.

function install_vmthunder {
    sudo "$VMTHUNDER_DIR/scripts/install-deps.sh"
    make -C "$VMTHUNDER_DIR" build
    sudo install -m 0755 "$VMTHUNDER_DIR/bin/vmthunder" /usr/local/bin/vmthunder
    pip_install "$VMTHUNDER_DIR/cinder-connector" "$VMTHUNDER_DIR/nova-plugin"
}

function configure_vmthunder {
    sudo install -d -m 0755 "$VMTHUNDER_CONF_DIR" "$VMTHUNDER_STATE_DIR"
    sudo tee "$VMTHUNDER_CONF_DIR/vmthunder.conf" >/dev/null <<CONF
[DEFAULT]
state_dir = $VMTHUNDER_STATE_DIR
api_socket = $VMTHUNDER_API_SOCKET
nbd_socket_dir = /run/vmthunder/nbd
socket_group = $VMTHUNDER_SOCKET_GROUP

[cache]
dir = $VMTHUNDER_STATE_DIR/cache
size_budget = $VMTHUNDER_CACHE_BUDGET

[metrics]
listen = $VMTHUNDER_METRICS_LISTEN
CONF
    sudo install -m 0644 "$VMTHUNDER_DIR/contrib/systemd/vmthunder.service" /etc/systemd/system/vmthunder.service
    sudo sed -i "s|^ExecStart=.*|ExecStart=/usr/local/bin/vmthunder daemon --config $VMTHUNDER_CONF_DIR/vmthunder.conf|" \
        /etc/systemd/system/vmthunder.service
    sudo systemctl daemon-reload

    iniset "$NOVA_CONF" DEFAULT compute_driver vmthunder.VMThunderDriver
    iniset "$NOVA_CONF" vmthunder enabled True
    iniset "$NOVA_CONF" vmthunder api_socket "$VMTHUNDER_API_SOCKET"
    iniset "$NOVA_CONF" vmthunder reconnect_delay 5
}

function start_vmthunder {
    sudo systemctl enable --now vmthunder.service
}

function stop_vmthunder {
    sudo systemctl stop vmthunder.service || true
}

if is_service_enabled vmthunder || [[ -n "${VMTHUNDER_FORCE:-}" ]]; then
    if [[ "$1" == "stack" && "$2" == "install" ]]; then
        install_vmthunder
    elif [[ "$1" == "stack" && "$2" == "post-config" ]]; then
        configure_vmthunder
    elif [[ "$1" == "stack" && "$2" == "extra" ]]; then
        start_vmthunder
    fi
    if [[ "$1" == "unstack" ]]; then
        stop_vmthunder
    fi
fi
