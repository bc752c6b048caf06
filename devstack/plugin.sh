#!/bin/bash
# devstack plugin for VMThunder: installs the sidecar (a prebuilt binary, or
# built with a Go toolchain it fetches), runs it with run_process, installs
# the os-brick connector and the Nova driver, points nova-compute at both,
# and publishes devstack's image as a template volume in Cinder.
# devstack/README.md says what each phase does and why.

VMTHUNDER_CONF=$VMTHUNDER_CONF_DIR/vmthunder.conf

# --- install -------------------------------------------------------------

# _vmthunder_go_release prints the Go release the build needs: go.mod's
# go line unless VMTHUNDER_GO_VERSION names one.
function _vmthunder_go_release {
    if [[ -n "$VMTHUNDER_GO_VERSION" ]]; then
        echo "$VMTHUNDER_GO_VERSION"
    else
        awk '$1 == "go" { print $2; exit }' "$VMTHUNDER_DIR/go.mod"
    fi
}

# _vmthunder_fetch_go downloads a Go release into VMTHUNDER_GO_ROOT (once)
# and sets VMTHUNDER_GO_CMD. Debian's and Ubuntu's golang are older than
# go.mod asks for, and devstack installs none.
function _vmthunder_fetch_go {
    local release arch file root tmp want got
    release=$(_vmthunder_go_release)
    [[ -n "$release" ]] || die $LINENO "vmthunder: no go line in $VMTHUNDER_DIR/go.mod"
    case "$(uname -m)" in
        x86_64) arch=amd64 ;;
        aarch64) arch=arm64 ;;
        ppc64le) arch=ppc64le ;;
        s390x) arch=s390x ;;
        *) die $LINENO "vmthunder: Go has no release for $(uname -m); set VMTHUNDER_PREBUILT_BIN" ;;
    esac
    file=go$release.linux-$arch.tar.gz
    root=$VMTHUNDER_GO_ROOT/go$release
    VMTHUNDER_GO_CMD=$root/bin/go
    if [[ -x "$VMTHUNDER_GO_CMD" ]]; then
        return 0
    fi
    tmp=$(mktemp -d)
    if ! curl -fsSL --retry 3 -o "$tmp/$file" "$VMTHUNDER_GO_DOWNLOAD_URL/$file"; then
        rm -rf "$tmp"
        die $LINENO "vmthunder: could not download $VMTHUNDER_GO_DOWNLOAD_URL/$file"
    fi
    want=$VMTHUNDER_GO_SHA256
    if [[ -z "$want" ]]; then
        # The download site lists every file with its SHA-256.
        want=$(curl -fsSL --retry 3 "$VMTHUNDER_GO_DOWNLOAD_URL/?mode=json&include=all" |
            python3 -c 'import json, sys
for r in json.load(sys.stdin):
    for f in r.get("files", []):
        if f.get("filename") == sys.argv[1]:
            print(f.get("sha256", ""))
            sys.exit()' "$file")
    fi
    got=$(sha256sum "$tmp/$file" | cut -d' ' -f1)
    if [[ -z "$want" || "$got" != "$want" ]]; then
        rm -rf "$tmp"
        die $LINENO "vmthunder: $file has SHA-256 $got, expected ${want:-(none listed)}"
    fi
    mkdir -p "$root"
    tar -C "$root" --strip-components=1 -xzf "$tmp/$file"
    rm -rf "$tmp"
}

# _vmthunder_build builds the sidecar into VMTHUNDER_BUILD_OUT.
function _vmthunder_build {
    # cgo: the userspace iSCSI initiator (libiscsi) and libvirt's API.
    install_package build-essential pkg-config libiscsi-dev libvirt-dev
    local toolchain=local
    if [[ -n "$VMTHUNDER_GO" ]]; then
        VMTHUNDER_GO_CMD=$VMTHUNDER_GO
        "$VMTHUNDER_GO_CMD" version >/dev/null 2>&1 ||
            die $LINENO "vmthunder: VMTHUNDER_GO=$VMTHUNDER_GO does not run; unset it to download Go"
        # Go 1.21+ fetches the release go.mod names (checksum-verified).
        toolchain=auto
    else
        _vmthunder_fetch_go
    fi
    mkdir -p "$(dirname "$VMTHUNDER_BUILD_OUT")"
    (cd "$VMTHUNDER_DIR" && GOTOOLCHAIN=$toolchain "$VMTHUNDER_GO_CMD" build \
        -o "$VMTHUNDER_BUILD_OUT" ./sidecar/cmd/vmthunder) ||
        die $LINENO "vmthunder: building the sidecar failed"
}

function install_vmthunder {
    local bin=$VMTHUNDER_PREBUILT_BIN
    if [[ -n "$bin" ]]; then
        [[ -f "$bin" && -x "$bin" ]] ||
            die $LINENO "vmthunder: VMTHUNDER_PREBUILT_BIN=$bin is not an executable file"
    else
        _vmthunder_build
        bin=$VMTHUNDER_BUILD_OUT
    fi
    sudo install -D -m 0755 "$bin" "$VMTHUNDER_INSTALLED_BIN"
    # Not editable, and without dependencies: nova and os-brick are
    # devstack's own (git checkouts, installed editable, or its
    # constraints); the resolver must not swap them for PyPI releases.
    # The Nova plugin loads with an editable nova: it puts nothing into
    # nova's tree (see nova-plugin/nova_virt_vmthunder).
    pip_install --no-deps "$VMTHUNDER_DIR/cinder-connector" "$VMTHUNDER_DIR/nova-plugin"
}

# --- post-config -------------------------------------------------------------

# _vmthunder_groups makes the API's group (with the stack user, who runs
# nova-compute, in it) and picks QEMU's group for the NBD sockets.
function _vmthunder_groups {
    if [[ -z "$VMTHUNDER_NBD_GROUP" ]]; then
        if is_fedora; then
            VMTHUNDER_NBD_GROUP=qemu
        else
            VMTHUNDER_NBD_GROUP=libvirt-qemu
        fi
    fi
    getent group "$VMTHUNDER_NBD_GROUP" >/dev/null ||
        die $LINENO "vmthunder: no group $VMTHUNDER_NBD_GROUP (QEMU's); set VMTHUNDER_NBD_GROUP"
    [[ "$VMTHUNDER_API_GROUP" != "$VMTHUNDER_NBD_GROUP" ]] ||
        die $LINENO "vmthunder: VMTHUNDER_API_GROUP must not be QEMU's group: a guest that takes over QEMU could then ask the root daemon to open files"
    if ! getent group "$VMTHUNDER_API_GROUP" >/dev/null; then
        sudo groupadd --system "$VMTHUNDER_API_GROUP"
    fi
    # run_process starts nova-compute after this phase, as STACK_USER with
    # that user's groups: this one included.
    sudo usermod -a -G "$VMTHUNDER_API_GROUP" "$STACK_USER"
}

# _vmthunder_cinder_auth prints how the sidecar authenticates to Cinder:
# VMTHUNDER_CINDER_AUTH_STRATEGY, else keystone where devstack runs
# Keystone and noauth where it does not. (A compute-only node of a
# multinode devstack sets keystone: Keystone runs on the controller, whose
# plugin made the user.)
function _vmthunder_cinder_auth {
    if [[ -n "$VMTHUNDER_CINDER_AUTH_STRATEGY" ]]; then
        echo "$VMTHUNDER_CINDER_AUTH_STRATEGY"
    elif is_service_enabled keystone; then
        echo keystone
    else
        echo noauth
    fi
}

# _vmthunder_cinder_section prints [cinder]; it holds a password, so the
# config file is root's, mode 0600.
function _vmthunder_cinder_section {
    echo "[cinder]"
    if [[ "$(_vmthunder_cinder_auth)" == keystone ]]; then
        cat <<EOF
auth_strategy = keystone
auth_url = $KEYSTONE_SERVICE_URI/v3
username = $VMTHUNDER_SERVICE_USER
password = $SERVICE_PASSWORD
user_domain_name = $SERVICE_DOMAIN_NAME
project_name = $SERVICE_PROJECT_NAME
project_domain_name = $SERVICE_DOMAIN_NAME
region_name = $REGION_NAME
EOF
    else
        echo "auth_strategy = noauth"
    fi
    cat <<EOF
endpoint = $VMTHUNDER_CINDER_ENDPOINT
template_volume_type = $VMTHUNDER_TEMPLATE_VOLUME_TYPE
EOF
}

function _vmthunder_write_config {
    case "$(_vmthunder_cinder_auth)" in
        keystone) ;;
        noauth)
            [[ -n "$VMTHUNDER_CINDER_ENDPOINT" ]] ||
                die $LINENO "vmthunder: without keystone, set VMTHUNDER_CINDER_ENDPOINT (Cinder's noauth endpoint ending in the project id)"
            ;;
        *) die $LINENO "vmthunder: VMTHUNDER_CINDER_AUTH_STRATEGY must be keystone or noauth" ;;
    esac
    local tmp
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
# Written by the VMThunder devstack plugin (contrib/vmthunder.conf explains
# every key).
[DEFAULT]
state_dir = $VMTHUNDER_STATE_DIR
api_socket = $VMTHUNDER_API_SOCKET
nbd_socket_dir = $VMTHUNDER_NBD_SOCKET_DIR
api_group = $VMTHUNDER_API_GROUP
nbd_group = $VMTHUNDER_NBD_GROUP
allowed_origin_dirs = $VMTHUNDER_ALLOWED_ORIGIN_DIRS
allowed_origin_devices = $VMTHUNDER_ALLOWED_ORIGIN_DEVICES
# Template-backed root disks keep their copy-on-write store in the
# instance's directory.
allowed_cow_dirs = $VMTHUNDER_STATE_DIR/cow,$NOVA_INSTANCES_PATH

[cache]
dir = $VMTHUNDER_STATE_DIR/cache
size_budget = $VMTHUNDER_CACHE_BUDGET

[metrics]
listen = $VMTHUNDER_METRICS_LISTEN

$(_vmthunder_cinder_section)
EOF
    sudo install -d -m 0755 "$VMTHUNDER_CONF_DIR"
    sudo install -m 0600 -o root -g root "$tmp" "$VMTHUNDER_CONF"
    rm -f "$tmp"
}

# _vmthunder_configure_nova sets nova-compute's options in $NOVA_CONF:
# start_nova_compute (lib/nova) makes $NOVA_CPU_CONF a fresh copy of
# $NOVA_CONF after this phase, so anything set in $NOVA_CPU_CONF now is
# lost. local.conf's [[post-config|$NOVA_CPU_CONF]] is merged after the
# copy and still overrides these.
function _vmthunder_configure_nova {
    # configure_neutron_nova edits $NOVA_CONF in the background during this
    # phase and iniset rewrites the whole file: wait for it, as stack.sh
    # does before its own edits (its later wait is then a no-op).
    if declare -F async_wait >/dev/null; then
        async_wait configure_neutron_nova
    fi
    # vmthunder.VMThunderDriver is nova.virt.vmthunder.VMThunderDriver to
    # nova's load_compute_driver; the Nova plugin provides that name.
    iniset "$NOVA_CONF" DEFAULT compute_driver vmthunder.VMThunderDriver
    iniset "$NOVA_CONF" vmthunder enabled True
    iniset "$NOVA_CONF" vmthunder api_socket "$VMTHUNDER_API_SOCKET"
    iniset "$NOVA_CONF" vmthunder reconnect_delay "$VMTHUNDER_RECONNECT_DELAY"
}

function configure_vmthunder {
    _vmthunder_groups
    if is_service_enabled keystone; then
        create_service_user "$VMTHUNDER_SERVICE_USER" "$VMTHUNDER_SERVICE_ROLE"
    fi
    _vmthunder_write_config
    _vmthunder_configure_nova
}

function start_vmthunder {
    # As the packaged unit's RuntimeDirectory: QEMU passes through to nbd/.
    sudo install -d -m 0711 "$(dirname "$VMTHUNDER_API_SOCKET")"
    sudo install -d -m 0700 "$VMTHUNDER_STATE_DIR"
    run_process vmthunder "$VMTHUNDER_INSTALLED_BIN daemon --config $VMTHUNDER_CONF" "" root
    # nova-compute starts after this phase and asks the sidecar for this
    # node's initiator: wait until the API answers.
    for _ in $(seq 1 "${SERVICE_TIMEOUT:-60}"); do
        if sudo "$VMTHUNDER_INSTALLED_BIN" --socket "$VMTHUNDER_API_SOCKET" status >/dev/null 2>&1; then
            return 0
        fi
        sleep 1
    done
    die $LINENO "vmthunder: the sidecar's API did not answer at $VMTHUNDER_API_SOCKET (journalctl -u devstack@vmthunder)"
}

# --- extra ---------------------------------------------------------------

# _vmthunder_publish_image publishes Glance image $1 as a template: Cinder
# makes the volume from the image, the sidecar's publish reads it back for
# its generation and tags it (docs/api.md, "Templates").
function _vmthunder_publish_image {
    sudo "$VMTHUNDER_INSTALLED_BIN" publish --config "$VMTHUNDER_CONF" --image "$1" \
        ${VMTHUNDER_TEMPLATE_SIZE_GIB:+--size-gib "$VMTHUNDER_TEMPLATE_SIZE_GIB"}
}

# publish_vmthunder_templates makes the multiattach template volume type
# and publishes VMTHUNDER_TEMPLATE_IMAGES (devstack's image by default) as
# templates; Cinder and Glance run from here on.
function publish_vmthunder_templates {
    local images=${VMTHUNDER_TEMPLATE_IMAGES-$DEFAULT_IMAGE_NAME}
    [[ -n "$images" ]] || return 0
    # (is_service_enabled answers whether any one of its arguments is.)
    if ! is_service_enabled keystone || ! is_service_enabled cinder || ! is_service_enabled glance; then
        warn $LINENO "vmthunder: no templates published (they need keystone, cinder and glance)"
        return 0
    fi
    local os_admin="openstack --os-cloud devstack-admin --os-region-name $REGION_NAME"
    if ! $os_admin volume type show "$VMTHUNDER_TEMPLATE_VOLUME_TYPE" >/dev/null 2>&1; then
        $os_admin volume type create --public --property multiattach="<is> True" \
            "$VMTHUNDER_TEMPLATE_VOLUME_TYPE" ||
            die $LINENO "vmthunder: could not create volume type $VMTHUNDER_TEMPLATE_VOLUME_TYPE"
    fi
    local name id
    local -a names
    IFS=, read -ra names <<<"$images"
    for name in "${names[@]}"; do
        id=$($os_admin image show -f value -c id "$name") ||
            die $LINENO "vmthunder: no image $name in Glance"
        _vmthunder_publish_image "$id" ||
            die $LINENO "vmthunder: publishing image $name ($id) as a template failed"
    done
}

# --- unstack, clean ------------------------------------------------------

# stop_vmthunder runs while Cinder is still up (unstack runs plugins
# first): removing the exports makes the sidecar delete its template
# attachments there, which nothing else would.
function stop_vmthunder {
    if [[ "$VMTHUNDER_UNSTACK_REMOVE_EXPORTS" == "True" ]] && sudo test -S "$VMTHUNDER_API_SOCKET"; then
        local id ids
        ids=$(sudo "$VMTHUNDER_INSTALLED_BIN" --socket "$VMTHUNDER_API_SOCKET" list --json |
            python3 -c 'import json, sys; print("\n".join(e["id"] for e in json.load(sys.stdin)["exports"]))') ||
            warn $LINENO "vmthunder: could not list the exports"
        for id in $ids; do
            sudo "$VMTHUNDER_INSTALLED_BIN" --socket "$VMTHUNDER_API_SOCKET" detach "$id" ||
                warn $LINENO "vmthunder: could not remove export $id"
        done
    fi
    stop_process vmthunder
    sudo rm -f "$VMTHUNDER_API_SOCKET"
    sudo rm -rf "$VMTHUNDER_NBD_SOCKET_DIR"
}

# _vmthunder_rm_dir removes a directory the plugin made, never / or a
# relative path (a mistyped variable).
function _vmthunder_rm_dir {
    if [[ "$1" == /?* && "$1" != *..* ]]; then
        sudo rm -rf "$1"
    fi
}

function cleanup_vmthunder {
    _vmthunder_rm_dir "$VMTHUNDER_STATE_DIR"
    sudo rmdir "$(dirname "$VMTHUNDER_API_SOCKET")" 2>/dev/null || true
    sudo rm -f "$VMTHUNDER_CONF" "$VMTHUNDER_INSTALLED_BIN"
    sudo rmdir "$VMTHUNDER_CONF_DIR" 2>/dev/null || true
    _vmthunder_rm_dir "$VMTHUNDER_GO_ROOT"
    sudo gpasswd -d "$STACK_USER" "$VMTHUNDER_API_GROUP" >/dev/null 2>&1 || true
}

if is_service_enabled vmthunder; then
    if [[ "$1" == "stack" && "$2" == "install" ]]; then
        install_vmthunder
    elif [[ "$1" == "stack" && "$2" == "post-config" ]]; then
        configure_vmthunder
        # Up before start_nova starts nova-compute.
        start_vmthunder
    elif [[ "$1" == "stack" && "$2" == "extra" ]]; then
        publish_vmthunder_templates
    fi
    if [[ "$1" == "unstack" ]]; then
        stop_vmthunder
    fi
    if [[ "$1" == "clean" ]]; then
        cleanup_vmthunder
    fi
fi
